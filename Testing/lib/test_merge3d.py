"""2D -> 3D merging: the rule on hand-made detections, and a synthetic volume with known lesions swept slice by
slice through the built-in engine's batch path."""

from __future__ import annotations

import numpy as np
import pytest
from MiniGPTMedSlicerLib.merge3d import MergeOptions, SliceDetection, link_tracks, merge_detections, overlap

from backend.engines.base import AnalysisInput, DecodedImage, StopToken
from backend.engines.builtin import BuiltinEngine

# (centre z, y, x), radii (z, y, x), delta intensity
LESIONS = [
    ((30, 40, 40), (8, 8, 8), 70),  # sphere, bright
    ((34, 80, 90), (5, 5, 5), 90),  # small sphere
    ((28, 60, 130), (10, 6, 9), -55),  # ellipsoid, dark
    ((40, 110, 60), (6, 10, 7), 45),  # ellipsoid, low contrast
]


def _volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:64, :160, :170]
    vol = np.zeros(zz.shape, np.float32)
    vol[((yy - 80) / 75.0) ** 2 + ((xx - 85) / 80.0) ** 2 < 1] = 100  # a body
    for (cz, cy, cx), (rz, ry, rx), d in LESIONS:
        vol[((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = 100 + d
    vol += rng.normal(0, 4, vol.shape)
    return np.clip(vol, 0, 255).astype(np.uint8)


def _pixel_to_ras(k: int) -> np.ndarray:
    """Axial slice k: voxel (i, j, k) sits at RAS (i, j, k); PNG pixel centres are at +0.5."""
    m = np.eye(4)
    m[:3, 2] = [0, 0, 1]
    m[:3, 3] = [-0.5, -0.5, float(k)]
    return m


def test_overlap_and_linking_rule():
    assert overlap((0, 0, 10, 10), (5, 5, 6, 6)) == 1.0
    assert overlap((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    dets = [
        SliceDetection(0, "a", (0, 0, 10, 10)),
        SliceDetection(1, "a", (2, 2, 12, 12)),
        SliceDetection(1, "b", (2, 2, 12, 12)),
        SliceDetection(3, "a", (2, 2, 12, 12)),
        SliceDetection(4, "a", (50, 50, 60, 60)),
    ]
    tracks = link_tracks(dets, MergeOptions())
    assert sorted(len(t) for t in tracks) == [1, 1, 1, 2]  # gap at slice 2 splits; label b is separate
    tracks = link_tracks(dets, MergeOptions(max_gap=1))
    assert sorted(len(t) for t in tracks) == [1, 1, 3]


@pytest.fixture(scope="module")
def swept():
    vol = _volume()
    eng = BuiltinEngine()
    eng.load()
    inputs = [
        AnalysisInput(task="detect", image=DecodedImage(vol[k], "PNG"), modality="CT", pixel_spacing_mm=(1, 1))
        for k in range(vol.shape[0])
    ]
    results = eng.analyze_batch(inputs, StopToken())
    dets = [SliceDetection(k, f.label, tuple(f.box), f.score) for k, r in enumerate(results) for f in r.findings]
    return merge_detections(dets, [_pixel_to_ras(k) for k in range(vol.shape[0])], slice_spacing_mm=1.0)


def test_one_3d_finding_per_lesion_with_centre_and_extent(swept):
    solid = [f for f in swept if not f.isolated]
    assert len(solid) == len(LESIONS), [(f.label, f.center_ras, f.slice_positions) for f in solid]
    for (cz, cy, cx), (rz, ry, rx), d in LESIONS:
        match = min(solid, key=lambda f: np.linalg.norm(np.subtract(f.center_ras, (cx, cy, cz))))
        assert match.label == ("hyperdense region" if d > 0 else "hypodense region")
        assert np.all(np.abs(np.subtract(match.center_ras, (cx, cy, cz))) <= 1.0), (match.center_ras, (cx, cy, cz))
        expected = np.array([2 * rx, 2 * ry, 2 * rz])
        assert np.all(np.abs(np.array(match.size_mm) - expected) <= 2.0), (match.size_mm, expected)
        assert match.first <= cz <= match.last
        assert match.best_score is not None and 0 < match.best_score < 1
        assert abs(match.best_slice_pos - cz) <= 2


def test_isolated_boxes_are_kept_and_marked():
    dets = [SliceDetection(5, "bright region", (10, 10, 20, 20), 0.7)]
    (f,) = merge_detections(dets, [_pixel_to_ras(k) for k in range(10)], 1.0)
    assert f.isolated and f.slice_positions == [5] and f.size_mm[2] == 1.0
