"""Exact values for the pixel <-> RAS geometry and the box codecs, written out by hand in the test (never with
the functions under test), on non-square images: each assertion pins a number a mutant of those modules would move
(make mutation, docs/testing.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from MiniGPTMedSlicerLib import geometry as G

from backend import box_codecs as B

# pixel -> RAS: 0.5 mm per pixel to the right along R, 0.75 mm per pixel down along -S, normal A times 2 mm,
# corner at (10, 20, 30)
M = np.array(
    [
        [0.5, 0.0, 0.0, 10.0],
        [0.0, 0.0, 2.0, 20.0],
        [0.0, -0.75, 0.0, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def test_pixel_to_ras_and_back():
    assert G.pixel_to_ras(M, 4.0, 8.0).tolist() == [12.0, 20.0, 24.0]
    assert G.pixel_to_ras(M.tolist(), 0.0, 0.0).tolist() == [10.0, 20.0, 30.0]
    u, v, w = G.ras_to_pixel(M, [12.0, 23.0, 24.0])
    assert (u, v, w) == pytest.approx((4.0, 8.0, 1.5))
    assert all(isinstance(c, float) for c in (u, v, w))


def test_slice_axes():
    ux, uy, n, sx, sy = G.slice_axes(M)
    assert ux.tolist() == [1.0, 0.0, 0.0] and uy.tolist() == [0.0, 0.0, -1.0]
    assert n.tolist() == [0.0, 1.0, 0.0]  # x × y = R × (-S) = +A
    assert (sx, sy) == (0.5, 0.75)


def test_box_to_plane_roi():
    center, size, axes = G.box_to_plane_roi(M, [2.0, 4.0, 10.0, 20.0], 3.0)
    assert center.tolist() == [13.0, 20.0, 21.0]  # pixel (6, 12)
    assert size == (4.0, 12.0, 3.0)
    assert axes.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]


def test_box_corners_ras():
    c = G.box_corners_ras(M, [2.0, 4.0, 10.0, 20.0])
    assert c.tolist() == [[11.0, 20.0, 27.0], [15.0, 20.0, 27.0], [15.0, 20.0, 15.0], [11.0, 20.0, 15.0]]


# -- box codecs on a 200 x 400 (portrait) and 400 x 200 (landscape) image ---------------------------------


def test_grid100_truncates_and_clips():
    assert B.pixels_to_grid100([10, 20, 150, 390], 200, 400) == (5, 5, 75, 97)
    assert B.pixels_to_grid100([199, 399, 199, 399], 200, 400) == (99, 99, 99, 99)  # 99.5, 99.75: truncated
    assert B.pixels_to_grid100([-5, -1, 250, 410], 200, 400) == (0, 0, 100, 100)
    assert B.pixels_to_grid100([200, 400, 200, 400], 200, 400) == (100, 100, 100, 100)
    assert B.grid100_to_pixels((5, 5, 75, 97), 200, 400) == [10.0, 20.0, 150.0, 388.0]


def test_norm1000_both_ways():
    assert B.pixels_to_norm1000([10, 20, 150, 390], 200, 400) == [50.0, 50.0, 750.0, 975.0]
    assert B.norm1000_to_pixels([50, 50, 750, 975], 200, 400) == [10.0, 20.0, 150.0, 390.0]
    assert B.norm1000_to_pixels(["50", "50", "750", "975"], 200, 400) == [10.0, 20.0, 150.0, 390.0]


def test_pad_offsets():
    assert B.pad_offsets(200, 400) == (100, 0)
    assert B.pad_offsets(400, 200) == (0, 100)
    assert B.pad_offsets(201, 400) == (99, 0)  # floor of 199 / 2
    assert B.pad_offsets(400, 201) == (0, 99)
    assert all(isinstance(v, int) for v in B.pad_offsets(400, 201) + B.pad_offsets(201, 400))
    assert B.pad_offsets(300, 300) == (0, 0)


def test_box2d_pads_the_short_side_portrait_and_landscape():
    # portrait 200 x 400: 100 px of padding on the left; y first
    assert B.pixels_to_box2d([0, 100, 200, 300], 200, 400) == [250.0, 250.0, 750.0, 750.0]
    assert B.box2d_to_pixels([250, 250, 750, 750], 200, 400) == [0.0, 100.0, 200.0, 300.0]
    assert B.box2d_to_pixels([100, 300, 500, 700], 200, 400) == [20.0, 40.0, 180.0, 200.0]
    # landscape 400 x 200: 100 px of padding on top
    assert B.pixels_to_box2d([100, 0, 300, 200], 400, 200) == [250.0, 250.0, 750.0, 750.0]
    assert B.box2d_to_pixels([300, 100, 700, 500], 400, 200) == [40.0, 20.0, 200.0, 180.0]


def test_resized_scales_each_axis_by_its_own_factor():
    got = B.pixels_to_resized([10, 20, 150, 390], 200, 400, 308, 532)
    assert got == pytest.approx([15.4, 26.6, 231.0, 518.7])
    back = B.resized_to_pixels([15.4, 26.6, 231.0, 518.7], 200, 400, 308, 532)
    assert back == pytest.approx([10.0, 20.0, 150.0, 390.0])
    assert B.resized_to_pixels(["154", "133", "308", "532"], 200, 400, 308, 532) == pytest.approx([100, 100, 200, 400])


@pytest.mark.parametrize(
    "box, expected",
    [
        ([10, 20, 30, 40], [10.0, 20.0, 30.0, 40.0]),
        ((30, 40, 10, 20), [10.0, 20.0, 30.0, 40.0]),  # corners ordered
        ([-5, -6, 250, 410], [0.0, 0.0, 200.0, 400.0]),  # clipped to the image
        ([250, 20, 260, 40], None),  # wholly right of the image: empty after clipping
        ([10, 20, 10, 40], None),  # zero width
        ([10, 20, 30, 20], None),  # zero height
        (["10", "20", "30", "40"], [10.0, 20.0, 30.0, 40.0]),
        ([10, 20, 30], None),
        ([10, 20, 30, 40, 50], None),
        ("10 20 30 40", None),
        ([10, "a", 30, 40], None),
        ([10, None, 30, 40], None),
        ([10, math.nan, 30, 40], None),
        ([10, 20, math.inf, 40], None),
        ([-math.inf, 20, 30, 40], None),
        ([199.5, 399.5, 300, 500], [199.5, 399.5, 200.0, 400.0]),
        ([-5, 10, 0.5, 20], [0.0, 10.0, 0.5, 20.0]),  # clipped at 0, not at 1
        ([10, 0.5, 30, 40], [10.0, 0.5, 30.0, 40.0]),
        ([10, -5, 30, 0.5], [10.0, 0.0, 30.0, 0.5]),
    ],
)
def test_clip_box(box, expected):
    assert B.clip_box(box, 200, 400) == expected
