"""Every box convention of backend.box_codecs: encode then decode gives the box back, on a portrait and a landscape
image, with the expected coordinates written out by hand (not computed with the codec)."""

from __future__ import annotations

import pytest

from backend import box_codecs as B

# portrait: 300 wide, 500 high; landscape: 500 wide, 300 high. The same finding, transposed.
PORTRAIT = (300, 500)
LANDSCAPE = (500, 300)
BOX_P = [30.0, 100.0, 150.0, 400.0]
BOX_L = [100.0, 30.0, 400.0, 150.0]


@pytest.mark.parametrize(
    ("size", "box", "expected"),
    [
        (PORTRAIT, BOX_P, [100, 200, 500, 800]),  # 30/300, 100/500, 150/300, 400/500 of 1000
        (LANDSCAPE, BOX_L, [200, 100, 800, 500]),
    ],
)
def test_norm1000_round_trip(size, box, expected):
    w, h = size
    assert B.pixels_to_norm1000(box, w, h) == pytest.approx(expected)
    assert B.norm1000_to_pixels(expected, w, h) == pytest.approx(box)


@pytest.mark.parametrize(
    ("size", "box", "expected"),
    [
        # padded to 500 x 500: 100 px left (portrait) or top (landscape); y first
        (PORTRAIT, BOX_P, [200, 260, 800, 500]),  # y0 100/500, x0 (30+100)/500, y1 400/500, x1 (150+100)/500
        (LANDSCAPE, BOX_L, [260, 200, 500, 800]),  # y0 (30+100)/500, x0 100/500, y1 (150+100)/500, x1 400/500
    ],
)
def test_medgemma_box2d_round_trip(size, box, expected):
    w, h = size
    assert B.pixels_to_box2d(box, w, h) == pytest.approx(expected)
    assert B.box2d_to_pixels(expected, w, h) == pytest.approx(box)


def test_pad_offsets():
    assert B.pad_offsets(*PORTRAIT) == (100, 0)
    assert B.pad_offsets(*LANDSCAPE) == (0, 100)
    assert B.pad_offsets(301, 500) == (99, 0)  # odd padding: the extra column goes right


@pytest.mark.parametrize(
    ("size", "model", "box", "expected"),
    [
        (PORTRAIT, (150, 250), BOX_P, [15, 50, 75, 200]),  # half size
        (LANDSCAPE, (250, 600), BOX_L, [50, 60, 200, 300]),  # x halved, y doubled
    ],
)
def test_qwen2_5_resized_pixels_round_trip(size, model, box, expected):
    w, h = size
    assert B.pixels_to_resized(box, w, h, *model) == pytest.approx(expected)
    assert B.resized_to_pixels(expected, w, h, *model) == pytest.approx(box)


@pytest.mark.parametrize(
    ("size", "box", "expected"),
    [
        (PORTRAIT, BOX_P, (10, 20, 50, 80)),
        (LANDSCAPE, BOX_L, (20, 10, 80, 50)),
    ],
)
def test_minigptmed_grid100_round_trip(size, box, expected):
    w, h = size
    assert B.pixels_to_grid100(box, w, h) == expected
    assert B.grid100_to_pixels(expected, w, h) == pytest.approx(box)


def test_grid100_truncates_and_clips_as_the_training_data():
    assert B.pixels_to_grid100([2.9, 4.9, 299.0, 600.0], *PORTRAIT) == (0, 0, 99, 100)


def test_clip_box_orders_clips_and_drops():
    assert B.clip_box([10, 5, -3, 50], 20, 40) == [0.0, 5.0, 10.0, 40.0]
    assert B.clip_box([30, 0, 40, 10], 20, 40) is None  # outside: empty after clipping
    assert B.clip_box([1, 2, float("nan"), 4], 20, 40) is None
    assert B.clip_box([1, 2, 3], 20, 40) is None
    assert B.clip_box("1234", 20, 40) is None
    assert B.clip_box([5, 5, 5, 9], 20, 40) is None  # zero width
