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


def _p2r_up(k: int) -> np.ndarray:
    # as _p2r, but slice k at S = +3k: the in-plane normal R x (-A) = -S points against the slice order
    return np.array([[0.5, 0, 0, 10.0], [0, -2.0, 0, 20.0], [0, 0, -3.0, 3.0 * k], [0, 0, 0, 1.0]])


def test_overlap_edge_cases():
    assert overlap((0, 0, 0.5, 0.5), (0, 0, 1, 1)) == 1.0  # a box smaller than one pixel is not floored at 1
    assert overlap((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0  # disjoint on both axes
    assert overlap((0, 0, 10, 10), (20, 0, 30, 10)) == 0.0  # disjoint along x only
    assert overlap((0, 0, 10, 10), (0, 20, 10, 30)) == 0.0  # disjoint along y only
    assert overlap((0, 0, 10, 10), (2, 3, 4, 5)) == 1.0  # the second box is the smaller one


def test_default_threshold_gap_and_isolation():
    at = [SliceDetection(0, "mass", (0, 0, 10, 10)), SliceDetection(1, "mass", (7, 0, 17, 10))]  # overlap 0.3
    below = [SliceDetection(0, "mass", (0, 0, 10, 10)), SliceDetection(1, "mass", (7.1, 0, 17.1, 10))]
    assert len(link_tracks(at, MergeOptions())) == 1
    assert len(link_tracks(below, MergeOptions())) == 2
    gap1 = [SliceDetection(0, "mass", (0, 0, 10, 10)), SliceDetection(2, "mass", (0, 0, 10, 10))]
    gap2 = [SliceDetection(0, "mass", (0, 0, 10, 10)), SliceDetection(3, "mass", (0, 0, 10, 10))]
    assert len(link_tracks(gap1, MergeOptions())) == 2
    assert len(link_tracks(gap1, MergeOptions(max_gap=1))) == 1
    assert len(link_tracks(gap2, MergeOptions(max_gap=1))) == 2
    p2r = [_p2r(k) for k in range(4)]
    one = [SliceDetection(0, "mass", (0, 0, 10, 10))]
    (f,) = merge_detections(one, p2r, 3.0)
    assert f.isolated and f.diameter_mm is None and f.volume_ml is None
    assert f.best_score is None and f.scores == [None]
    (f,) = merge_detections(one, p2r, 3.0, MergeOptions(min_slices=1))
    assert not f.isolated
    (f,) = merge_detections(at, p2r, 3.0)
    assert not f.isolated and f.first == 0 and f.last == 1


def test_normal_flipped_towards_the_slice_order():
    dets = [SliceDetection(k, "bright region", (10, 10, 30, 20), 0.5) for k in range(3)]
    (f,) = merge_detections(dets, [_p2r_up(k) for k in range(3)], 3.0)
    # columns: slice x = +R, slice y = -A, normal flipped from -S to +S (the slices go up)
    assert f.axes == [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]]
    # box middle (20, 15) on slice 0 is RAS (20, -10, 0); 6 mm up
    assert f.center_ras == pytest.approx((20.0, -10.0, 3.0))
    assert f.size_mm == pytest.approx((10.0, 20.0, 9.0))
    (f,) = merge_detections(dets, [_p2r(k) for k in range(3)], 3.0)
    assert f.axes == [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]  # not flipped: the slices go down


def test_best_slice_near_ties_nearest_the_middle():
    boxes = [(0, 0, 10, 10), (0, 0, 10, 9.4), (0, 0, 10, 9.5), (0, 0, 10, 10), (0, 0, 10, 5)]  # areas 100 94 95 100 50
    dets = [SliceDetection(k, f"mass ({k})", b, 0.1 * (k + 1)) for k, b in enumerate(boxes)]
    (f,) = merge_detections(dets, [_p2r(k) for k in range(5)], 3.0)
    # within 5 % of 100: slices 0, 2, 3; the middle of 0..4 is 2
    assert f.best_slice_pos == 2 and f.label == "mass (2)"
    # box 2's middle (5, 4.75) on slice 2: R 12.5, A 20 - 9.5, S -6
    assert f.best_center_ras == pytest.approx((12.5, 10.5, -6.0))
    assert f.boxes == [tuple(float(c) for c in b) for b in boxes]
    assert f.scores == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert f.best_score == pytest.approx(0.5)


def test_scores_that_are_not_finite_are_ignored():
    p2r = [_p2r(k) for k in range(2)]
    for bad in (float("nan"), float("inf")):
        dets = [SliceDetection(0, "mass", (0, 0, 10, 10), bad), SliceDetection(1, "mass", (0, 0, 10, 10), 0.3)]
        (f,) = merge_detections(dets, p2r, 3.0)
        assert f.best_score == 0.3


def test_unscored_findings_sort_by_length():
    dets = [SliceDetection(k, "mass", (0, 0, 10, 10)) for k in range(2)]
    dets += [SliceDetection(k, "cyst", (50, 50, 60, 60)) for k in range(3)]
    out = merge_detections(dets, [_p2r(k) for k in range(3)], 3.0)
    assert [f.label for f in out] == ["cyst", "mass"]


def test_nodule_rule_diameter_volume_and_extent():
    p2r = [_p2r(k) for k in range(9)]
    # pixels 0.5 x 2 mm: box 1 is 10 x 10 mm (d 10), box 2 is 14 x 12 mm (d 13)
    dets = [
        SliceDetection(1, "Lung nodule candidate (solid, 10 mm)", (10, 7, 30, 12), 0.2),
        SliceDetection(2, "lung nodule candidate (solid, 13 mm)", (10, 7, 38, 13), 0.6),
    ]
    (f,) = merge_detections(dets, p2r, 3.0)
    assert f.diameter_mm == pytest.approx(13.0)
    # inscribed ellipses pi/4 x (10 x 10 + 14 x 12) mm2, x 3 mm, in ml
    assert f.volume_ml == pytest.approx(3.14159265 / 4 * 268 * 3 / 1000)
    assert f.label == "lung nodule candidate (solid, 13 mm)"
    # d 10, s 3: kept while n x 3 <= 1.5 x 10 + 3 = 18, i.e. up to 6 slices
    six = [SliceDetection(k, "nodule", (10, 7, 30, 12)) for k in range(1, 7)]
    seven = [SliceDetection(k, "nodule", (10, 7, 30, 12)) for k in range(1, 8)]
    assert len(merge_detections(six, p2r, 3.0)) == 1
    assert merge_detections(seven, p2r, 3.0) == []
    assert len(merge_detections(seven, p2r, 3.0, MergeOptions(nodule_extent_factor=1.8))) == 1  # 21 <= 21
    lesion = [SliceDetection(k, "focal lesion candidate", (10, 7, 30, 12)) for k in range(1, 8)]
    assert merge_detections(lesion, p2r, 3.0) == []
    (mass,) = merge_detections([SliceDetection(k, "mass", (10, 7, 30, 12)) for k in range(7)], p2r, 3.0)
    assert mass.diameter_mm is None and mass.volume_ml is None
    single = [SliceDetection(1, "nodule", (10, 7, 30, 12))]
    assert merge_detections(single, p2r, 3.0) == []  # fewer than nodule_min_slices (2)
    (f,) = merge_detections(single, p2r, 3.0, MergeOptions(nodule_min_slices=1))
    assert f.diameter_mm == pytest.approx(10.0) and f.volume_ml == pytest.approx(3.14159265 / 4 * 100 * 3 / 1000)
    assert len(merge_detections(six[:2], p2r, 3.0)) == 1  # two slices are enough
    # a dropped nodule track does not end the merge: the tracks after it are still findings
    other = [SliceDetection(1, "mass", (60, 60, 70, 70)), SliceDetection(2, "mass", (60, 60, 70, 70))]
    assert [f.label for f in merge_detections(seven + other, p2r, 3.0)] == ["mass"]
    assert [f.label for f in merge_detections(single + other, p2r, 3.0)] == ["mass"]


def test_best_slice_is_the_largest_box_whatever_its_position():
    p2r = [_p2r(k) for k in range(2)]
    for first, second in [((90, 0, 100, 10), (88, 0, 99, 10)), ((0, 90, 10, 100), (0, 88, 10, 99))]:  # areas 100, 110
        (f,) = merge_detections([SliceDetection(0, "mass", first), SliceDetection(1, "mass", second)], p2r, 3.0)
        assert f.best_slice_pos == 1


def test_union_box_and_a_short_track_against_the_normal():
    # slice k at S = -0.5 k (0.5 mm apart, along the in-plane normal -S): not flipped
    p2r = [np.array([[0.5, 0, 0, 10.0], [0, -2.0, 0, 20.0], [0, 0, -3.0, -0.5 * k], [0, 0, 0, 1.0]]) for k in range(2)]
    dets = [SliceDetection(0, "mass", (10, 20, 30, 24)), SliceDetection(1, "mass", (12, 21, 31, 26))]
    (f,) = merge_detections(dets, p2r, 0.5)
    assert f.axes == [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]
    # union u 10..31, v 20..26: middle (20.5, 23) on slice 0 = RAS (20.25, -26, 0), 0.5 mm down
    assert f.center_ras == pytest.approx((20.25, -26.0, -0.25))
    assert f.size_mm == pytest.approx((10.5, 12.0, 1.0))
    # two slices going up (S = +3k): flipped
    (f,) = merge_detections(dets, [_p2r_up(k) for k in range(2)], 3.0)
    assert f.axes == [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]]


def test_a_skipped_pair_does_not_stop_the_linking():
    # tracks A (0..10) and B (5..15) on slice 0; on slice 1, d0 overlaps A 1.0 and B 0.5, d1 overlaps B only, 0.4:
    # A-d0 links, B-d0 is skipped (d0 taken), B-d1 still links
    dets = [
        SliceDetection(0, "mass", (0, 0, 10, 10)),
        SliceDetection(0, "mass", (5, 0, 15, 10)),
        SliceDetection(1, "mass", (0, 0, 10, 10)),
        SliceDetection(1, "mass", (11, 0, 21, 10)),
    ]
    tracks = link_tracks(dets, MergeOptions())
    assert [[d.box for d in t] for t in tracks] == [[(0, 0, 10, 10), (0, 0, 10, 10)], [(5, 0, 15, 10), (11, 0, 21, 10)]]


def test_best_slice_nearest_the_middle_of_a_track_that_starts_later():
    heights = [10, 9.4, 9.5, 9.4, 10]  # slices 1..5, areas 100 94 95 94 100: near ties on 1, 3, 5
    dets = [SliceDetection(k + 1, "mass", (0, 0, 10, h)) for k, h in enumerate(heights)]
    (f,) = merge_detections(dets, [_p2r(k) for k in range(6)], 3.0)
    assert f.best_slice_pos == 3  # the middle of 1..5
