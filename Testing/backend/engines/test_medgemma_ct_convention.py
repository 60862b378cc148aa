"""MedGemma's trained CT/MR convention from the slice values on the wire, on the real chest CT and the MNI volume."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from backend.engines.base import AnalysisInput, DecodedImage, ScalarValues, model_image
from backend.families import medgemma_rgb


def _independent_window(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    # from the notebook's description, pixel by pixel in Python floats; round() is round-half-to-even like np.round
    out = np.empty(hu.shape, np.uint8)
    flat = hu.ravel()
    res = out.ravel()
    for i, v in enumerate(flat):
        c = min(max(float(v), lo), hi)
        res[i] = round((c - lo) / (hi - lo) * 255.0)
    return out


def test_ct_three_windows_equal_an_independent_computation(chest_ct_path):
    hu = np.asarray(nib.load(str(chest_ct_path)).dataobj[:, :, 73], dtype=np.float32).T[::-1][::4, ::4]
    rgb = medgemma_rgb(hu, "HU")
    assert rgb.shape == (*hu.shape, 3) and rgb.dtype == np.uint8
    for ch, (lo, hi) in enumerate(((-1024, 1024), (-135, 215), (0, 80))):
        assert np.array_equal(rgb[:, :, ch], _independent_window(hu, lo, hi)), ch
    # lung is dark in G and B, the aorta's contrast bright in all three
    assert rgb[:, :, 1][hu < -900].max() == 0 and rgb[:, :, 2][hu > 300].min() == 255


def test_model_image_uses_values_for_medgemma_only(chest_ct_path, mni_path):
    hu = np.asarray(nib.load(str(chest_ct_path)).dataobj[:, :, 60], dtype=np.float32).T[::-1][::2, ::2]
    shown = np.clip((hu + 160) / 400 * 255, 0, 255).astype(np.uint8)
    inp = AnalysisInput("report", DecodedImage(shown, "PNG"), values=ScalarValues(hu, "HU"))
    assert np.array_equal(np.asarray(model_image("medgemma", inp)), medgemma_rgb(hu, "HU"))
    assert np.array_equal(np.asarray(model_image("qwen3_vl", inp))[:, :, 0], shown)  # others: what the view shows
    vol = np.asarray(nib.load(str(mni_path)).dataobj).astype(np.float32)
    sl = vol[:, :, 90].T[::-1]
    vmin, vmax = float(vol.min()), float(vol.max())
    mr = AnalysisInput("report", DecodedImage(sl.astype(np.uint8), "PNG"), values=ScalarValues(sl, "raw", vmin, vmax))
    out = np.asarray(model_image("medgemma", mr))
    expected = _independent_window(sl, vmin, vmax)  # over the whole acquisition's range, not the slice's
    assert np.array_equal(out[:, :, 0], expected) and np.array_equal(out[:, :, 0], out[:, :, 2])
