"""The built-in engine on synthetic images with known blobs and on real slices."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image

from backend.engines.base import AnalysisInput, DecodedImage, StopToken
from backend.engines.builtin import BuiltinEngine


def _run(img: np.ndarray, task="detect", **kw):
    eng = BuiltinEngine()
    eng.load()
    (res,) = eng.analyze_batch([AnalysisInput(task=task, image=DecodedImage(img, "PNG"), **kw)], StopToken())
    return res


@pytest.mark.parametrize("radius,delta,noise", [(4, 60, 5), (8, 25, 5), (15, 40, 8), (25, -45, 6), (6, -30, 4)])
def test_finds_blobs_of_various_size_and_contrast(radius, delta, noise):
    cy, cx = 110, 140
    img = blob_image(size=256, blobs=((cy, cx, radius, delta),), noise=noise, seed=radius)
    res = _run(img, modality="CT")
    assert res.findings, res.text
    best = res.findings[0]
    x0, y0, x1, y1 = best.box
    assert best.label == ("hyperdense region" if delta > 0 else "hypodense region")
    assert abs((x0 + x1) / 2 - cx) <= 1.5 and abs((y0 + y1) / 2 - cy) <= 1.5
    assert abs((x1 - x0) - 2 * radius) <= 3 and abs((y1 - y0) - 2 * radius) <= 3
    assert 0 < best.score < 1


def test_plain_tissue_gives_no_findings():
    res = _run(blob_image(blobs=(), noise=5), modality="MR")
    assert res.findings == []
    assert "No region stands out" in res.text


def test_strongest_first_and_capped():
    blobs = tuple((40 + 35 * (i // 4), 40 + 35 * (i % 4), 5, 20 + 10 * i) for i in range(12))
    res = _run(blob_image(size=256, blobs=blobs, noise=3), modality="XR")
    assert 1 <= len(res.findings) <= 8
    scores = [f.score for f in res.findings]
    assert res.findings[0].label == "bright region"
    assert max(scores) == scores[0]


def test_sizes_in_mm_when_spacing_given():
    img = blob_image(blobs=((100, 90, 10, 60),))
    res = _run(img, modality="CT", pixel_spacing_mm=(0.5, 2.0))
    # 20 px wide x 20 px tall -> 40 mm x 10 mm
    assert "× 10." in res.text or "× 9." in res.text or "× 11." in res.text
    assert "mm" in res.text


def _mni_slice(mni_path) -> np.ndarray:
    vol = np.asarray(nib.load(str(mni_path)).dataobj)
    sl = vol[:, :, 90].T[::-1]  # axial slice, anterior up
    return sl.astype(np.uint8)


def test_real_mri_slice_gives_plausible_results(mni_path):
    sl = _mni_slice(mni_path)
    det = _run(sl, modality="MR", pixel_spacing_mm=(1.0, 1.0))
    assert det.findings, det.text
    h, w = sl.shape
    for f in det.findings:
        x0, y0, x1, y1 = f.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert (x1 - x0) * (y1 - y0) < 0.25 * w * h
        assert f.label in ("hyperintense region", "hypointense region")
    rep = _run(sl, task="report", modality="MR", pixel_spacing_mm=(1.0, 1.0))
    assert "MR image of 197×233 pixels" in rep.text and "not a diagnosis" in rep.text


def test_real_ct_slice(chest_ct_path):
    img = nib.load(str(chest_ct_path))
    hu = np.asarray(img.dataobj[:, :, 70], dtype=np.float32).T[::-1]
    lo, hi = 40 - 200, 40 + 200  # soft-tissue window
    win = (np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    res = _run(win, modality="CT", pixel_spacing_mm=(0.703, 0.703))
    assert res.findings
    assert all(f.label in ("hyperdense region", "hypodense region") for f in res.findings)


def test_identify_region_classifies_contrast():
    img = blob_image(blobs=((100, 90, 10, 60), (160, 170, 8, -50)))
    bright = _run(img, task="identify", region=(82.0, 92.0, 98.0, 108.0), modality="CT")
    dark = _run(img, task="identify", region=(164.0, 154.0, 176.0, 166.0), modality="CT")
    plain = _run(img, task="identify", region=(120.0, 60.0, 140.0, 80.0), modality="CT")
    assert bright.findings[0].label == "hyperdense region"
    assert dark.findings[0].label == "hypodense region"
    assert plain.findings[0].label == "region similar to the surrounding tissue"
