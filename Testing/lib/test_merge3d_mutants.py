"""Exact values of the 3D merge (MiniGPTMedSlicerLib.merge3d) computed by hand: pixel sizes that differ along x and
y, a normal that points against the slice order's z, ties and competing tracks (make mutation, docs/testing.md)."""

from __future__ import annotations

import numpy as np
import pytest
from MiniGPTMedSlicerLib.merge3d import MergeOptions, SliceDetection, label_kind, link_tracks, merge_detections, overlap


def _p2r(k: int) -> np.ndarray:
    # 0.5 mm per pixel along R, 2 mm per pixel down along -A, normal R x (-A) = -S times 3 mm, slice k at S = -3k
    return np.array([[0.5, 0, 0, 10.0], [0, -2.0, 0, 20.0], [0, 0, -3.0, -3.0 * k], [0, 0, 0, 1.0]])


def test_overlap_is_intersection_over_the_smaller_box():
    assert overlap((10, 0, 20, 10), (15, 0, 35, 10)) == 0.5
    assert overlap((15, 0, 35, 10), (10, 0, 20, 10)) == 0.5
    assert overlap((0, 10, 10, 20), (0, 15, 10, 35)) == 0.5
    assert overlap((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0


def test_label_kind_cuts_at_the_first_parenthesis():
    assert label_kind("  Mass (3 mm) (solid) ") == "mass"


def test_one_track_centre_size_and_best_slice():
    dets = [
        SliceDetection(2, "bright region", (10, 10, 30, 20), 0.4),
        SliceDetection(3, "bright region", (12, 10, 32, 22), 0.9),
        SliceDetection(4, "bright region", (10, 12, 30, 20), 0.5),
    ]
    (f,) = merge_detections(dets, [_p2r(k) for k in range(6)], 3.0)
    assert f.slice_positions == [2, 3, 4] and not f.isolated
    # union box u 10..32, v 10..22; its middle (21, 16) on slice 2 is RAS (20.5, -12, -6); 6 mm deep along -S
    assert f.center_ras == pytest.approx((20.5, -12.0, -9.0))
    assert f.size_mm == pytest.approx((11.0, 24.0, 9.0))
    assert f.best_slice_pos == 3  # the largest box
    assert f.best_center_ras == pytest.approx((21.0, -12.0, -9.0))
    assert f.best_score == 0.9


def test_tracks_skip_finished_tracks_and_other_labels():
    dets = [
        SliceDetection(0, "mass", (0, 0, 10, 10)),
        SliceDetection(2, "mass", (50, 50, 60, 60)),
        SliceDetection(3, "cyst", (50, 50, 60, 60)),
        SliceDetection(3, "mass", (50, 50, 60, 60)),
    ]
    tracks = link_tracks(dets, MergeOptions())
    assert [[(d.slice_pos, d.label) for d in t] for t in tracks] == [
        [(0, "mass")],
        [(2, "mass"), (3, "mass")],
        [(3, "cyst")],
    ]


def test_overlap_exactly_at_the_threshold_links():
    dets = [SliceDetection(0, "mass", (0, 0, 10, 10)), SliceDetection(1, "mass", (7, 0, 17, 10))]
    assert len(link_tracks(dets, MergeOptions(min_overlap=0.3))) == 1


def test_the_best_overlap_wins_a_contested_detection():
    # two tracks end on slice 0; the detection on slice 1 overlaps track 0 more (0.8) than track 1 (0.5)
    dets = [
        SliceDetection(0, "mass", (0, 0, 10, 10)),
        SliceDetection(0, "mass", (3, 0, 13, 10)),
        SliceDetection(1, "mass", (-2, 0, 8, 10)),
    ]
    tracks = link_tracks(dets, MergeOptions())
    assert [[d.box for d in t] for t in tracks] == [[(0, 0, 10, 10), (-2, 0, 8, 10)], [(3, 0, 13, 10)]]
    # one track, two detections on slice 1: the better overlap joins, the other starts a track
    dets = [
        SliceDetection(0, "mass", (0, 0, 10, 10)),
        SliceDetection(1, "mass", (5, 0, 15, 10)),
        SliceDetection(1, "mass", (1, 0, 11, 10)),
    ]
    tracks = link_tracks(dets, MergeOptions())
    assert [[d.box for d in t] for t in tracks] == [[(0, 0, 10, 10), (1, 0, 11, 10)], [(5, 0, 15, 10)]]


def test_findings_without_a_score_sort_after_scored_ones():
    dets = [
        SliceDetection(0, "mass", (0, 0, 10, 10), None),
        SliceDetection(1, "mass", (0, 0, 10, 10), None),
        SliceDetection(0, "cyst", (50, 50, 60, 60), 0.5),
        SliceDetection(1, "cyst", (50, 50, 60, 60), 0.5),
    ]
    out = merge_detections(dets, [_p2r(k) for k in range(2)], 3.0)
    assert [f.label for f in out] == ["cyst", "mass"]
