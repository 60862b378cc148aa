"""2D -> 3D merging: the rule on hand-made detections, and a synthetic volume with known lesions swept slice by
slice through the built-in engine's batch path."""

from __future__ import annotations

import numpy as np
import pytest
from MiniGPTMedSlicerLib.merge3d import MergeOptions, SliceDetection, link_tracks, merge_detections, overlap

from backend.engines.base import AnalysisInput, DecodedImage, ScalarValues, StopToken
from backend.engines.builtin import BuiltinEngine

# (centre z, y, x), radii (z, y, x), delta intensity
LESIONS = [  # centre (z, y, x), radii (z, y, x) voxels, HU
    ((30, 40, 40), (8, 8, 8), 40),  # sphere
    ((34, 80, 90), (5, 5, 5), 30),  # small sphere
    ((28, 60, 130), (10, 7, 9), 20),  # ellipsoid
    ((40, 110, 60), (6, 10, 7), 45),  # ellipsoid, flat along z
]
VESSEL = (120, 125, 3)  # (y, x, radius): a tube running through every slice, round in each


def _volume(seed: int = 0) -> np.ndarray:
    """A synthetic CT in HU, 1 mm voxels: a soft-tissue body, one aerated lung field, solid nodules and a vessel."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:64, :160, :170]
    vol = np.full(zz.shape, -1000.0, np.float32)
    vol[((yy - 80) / 75.0) ** 2 + ((xx - 85) / 80.0) ** 2 < 1] = 40  # a body
    vol[((yy - 80) / 67.0) ** 2 + ((xx - 85) / 72.0) ** 2 < 1] = -860  # its lung
    for (cz, cy, cx), (rz, ry, rx), hu in LESIONS:
        vol[((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = hu
    vol[(yy - VESSEL[0]) ** 2 + (xx - VESSEL[1]) ** 2 < VESSEL[2] ** 2] = 40
    vol += rng.normal(0, 15, vol.shape)
    return vol


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
        AnalysisInput(
            task="detect",
            image=DecodedImage(np.zeros(vol.shape[1:], np.uint8), "PNG"),
            modality="CT",
            pixel_spacing_mm=(1, 1),
            values=ScalarValues(vol[k], "HU"),
        )
        for k in range(vol.shape[0])
    ]
    results = eng.analyze_batch(inputs, StopToken())
    dets = [SliceDetection(k, f.label, tuple(f.box), f.score) for k, r in enumerate(results) for f in r.findings]
    return merge_detections(dets, [_pixel_to_ras(k) for k in range(vol.shape[0])], slice_spacing_mm=1.0)


def test_one_3d_finding_per_lesion_with_centre_and_extent(swept):
    solid = [f for f in swept if not f.isolated]
    assert len(solid) == len(LESIONS), [(f.label, f.center_ras, f.slice_positions) for f in solid]
    for (cz, cy, cx), (rz, ry, rx), _hu in LESIONS:
        match = min(solid, key=lambda f: np.linalg.norm(np.subtract(f.center_ras, (cx, cy, cz))))
        assert match.label.startswith("lung nodule candidate (solid, ")
        assert np.all(np.abs(np.subtract(match.center_ras, (cx, cy, cz))) <= 1.0), (match.center_ras, (cx, cy, cz))
        expected = np.array([2 * rx, 2 * ry, 2 * rz])
        # in-plane within 2 mm; along the normal within 3 mm (the outermost caps, a few mm across, are not detected)
        assert np.all(np.abs(np.array(match.size_mm) - expected) <= [2.0, 2.0, 3.0]), (match.size_mm, expected)
        assert match.first <= cz <= match.last
        assert match.best_score is not None and 0 < match.best_score < 1
        assert abs(match.best_slice_pos - cz) <= 2


def test_isolated_boxes_are_kept_and_marked():
    dets = [SliceDetection(5, "bright region", (10, 10, 20, 20), 0.7)]
    (f,) = merge_detections(dets, [_pixel_to_ras(k) for k in range(10)], 1.0)
    assert f.isolated and f.slice_positions == [5] and f.size_mm[2] == 1.0


def test_nodule_rule_drops_the_vessel_and_reports_diameter_and_volume(swept):
    """The vessel is a round dot on every slice (a nodule candidate in 2D) but runs on: no 3D finding there."""
    vy, vx, _ = VESSEL
    assert all(np.hypot(f.center_ras[0] - vx, f.center_ras[1] - vy) > 10 for f in swept)
    (_, (rz, ry, rx), _) = LESIONS[0]
    f = min(swept, key=lambda f: np.linalg.norm(np.subtract(f.center_ras, (40, 40, 30))))
    assert abs(f.diameter_mm - 2 * rx) <= 2.0
    assert abs(f.volume_ml - 4 / 3 * np.pi * rx * ry * rz / 1000) <= 0.35 * 4 / 3 * np.pi * rx * ry * rz / 1000


def test_label_kind_links_measured_labels():
    dets = [
        SliceDetection(0, "lung nodule candidate (solid, 7 mm, 30 HU)", (0, 0, 10, 10)),
        SliceDetection(1, "lung nodule candidate (solid, 8 mm, 35 HU)", (1, 1, 11, 11)),
        SliceDetection(2, "lung nodule candidate (part-solid, 6 mm, -200 HU)", (1, 1, 10, 10)),
    ]
    assert [len(t) for t in link_tracks(dets, MergeOptions())] == [3]
    long_run = [SliceDetection(k, "lung nodule candidate (solid, 5 mm, 30 HU)", (0, 0, 7, 7)) for k in range(12)]
    eye = [np.eye(4) for _ in range(12)]
    assert merge_detections(long_run, eye, 1.0) == []  # 12 mm along the normal for a 7 mm dot: a vessel
    assert len(merge_detections(long_run[:8], eye, 1.0)) == 1
