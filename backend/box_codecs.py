"""Every box coordinate convention the engines and the OpenAI face speak, as small pure functions with their inverse,
and the one place that checks and sanitises boxes.

A box in *pixels* is the wire's convention (``protocol``): ``[x0, y0, x1, y1]`` in pixels of the image that was sent,
origin at the top-left corner of the top-left pixel, x right, y down. ``width`` x ``height`` is that image's size.

| convention          | who speaks it                     | coordinates                                                   |
|---------------------|-----------------------------------|---------------------------------------------------------------|
| ``grid100``         | MiniGPT-Med                       | integers ``[x0, y0, x1, y1]`` on 0..100 of width/height (truncated) |
| ``norm1000``        | Qwen3-VL, MedMO, our OpenAI face  | ``[x0, y0, x1, y1]`` on 0..1000 of width/height               |
| ``box2d``           | MedGemma                          | ``[y0, x0, y1, x1]`` on 0..1000 of the zero-padded square     |
| ``resized``         | Qwen2.5-VL                        | ``[x0, y0, x1, y1]`` in pixels of the smart-resized image     |
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Box = Sequence[float]

GRID = 100  # MiniGPT-Med's grid
NORM = 1000  # Qwen3-VL's and MedGemma's scale


# -- MiniGPT-Med: 0..100 grid ------------------------------------------------------------------------


def pixels_to_grid100(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """As MiniGPT-Med's training data: ``int(v / size * 100)`` (truncation), clipped to 0..100."""
    x0, y0, x1, y1 = box

    def c(v: float, size: int) -> int:
        return max(0, min(GRID, int(v / size * GRID)))

    return c(x0, width), c(y0, height), c(x1, width), c(y1, height)


def grid100_to_pixels(g: Sequence[int], width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = g
    return [x0 / GRID * width, y0 / GRID * height, x1 / GRID * width, y1 / GRID * height]


# -- 0..1000 of the image (Qwen3-VL, the OpenAI face) -------------------------------------------------


def pixels_to_norm1000(box: Box, width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0 / width * NORM, y0 / height * NORM, x1 / width * NORM, y1 / height * NORM]


def norm1000_to_pixels(c: Box, width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in c)
    return [x0 / NORM * width, y0 / NORM * height, x1 / NORM * width, y1 / NORM * height]


# -- MedGemma: y-first on 0..1000 of the zero-padded square ---------------------------------------------


def pad_offsets(width: int, height: int) -> tuple[int, int]:
    """Symmetric zero padding to a square (MedGemma's convention): (left, top)."""
    side = max(width, height)
    return (side - width) // 2, (side - height) // 2


def pixels_to_box2d(box: Box, width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = box
    s = max(width, height)
    left, top = pad_offsets(width, height)
    return [(y0 + top) / s * NORM, (x0 + left) / s * NORM, (y1 + top) / s * NORM, (x1 + left) / s * NORM]


def box2d_to_pixels(c: Box, width: int, height: int) -> list[float]:
    a, b, c2, d = (float(v) for v in c)
    s = max(width, height)
    left, top = pad_offsets(width, height)
    return [b / NORM * s - left, a / NORM * s - top, d / NORM * s - left, c2 / NORM * s - top]


# -- Qwen2.5-VL: pixels of the smart-resized image ------------------------------------------------------


def pixels_to_resized(box: Box, width: int, height: int, model_width: int, model_height: int) -> list[float]:
    x0, y0, x1, y1 = box
    sx, sy = model_width / width, model_height / height
    return [x0 * sx, y0 * sy, x1 * sx, y1 * sy]


def resized_to_pixels(c: Box, width: int, height: int, model_width: int, model_height: int) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in c)
    sx, sy = width / model_width, height / model_height
    return [x0 * sx, y0 * sy, x1 * sx, y1 * sy]


# -- native pixels: the one check and sanitiser ---------------------------------------------------------


def clip_box(box: object, width: int, height: int) -> list[float] | None:
    """Any box-like value -> a box that obeys the wire convention (``protocol.box_is_valid``), or None.

    Corners are ordered, the box clipped to the image; non-numbers, NaN, infinities and empty boxes give None."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    try:
        x0, y0, x1, y1 = (float(c) for c in box)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(c) for c in (x0, y0, x1, y1)):
        return None
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    x0, x1 = min(max(x0, 0.0), float(width)), min(max(x1, 0.0), float(width))
    y0, y1 = min(max(y0, 0.0), float(height)), min(max(y1, 0.0), float(height))
    if not (x1 > x0 and y1 > y0):
        return None
    return [x0, y0, x1, y1]
