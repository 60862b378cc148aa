"""Pixel <-> RAS geometry for captured slices (pure numpy).

A captured slice carries a 4x4 ``pixel_to_ras``: continuous PNG pixel coordinates ``[u, v, 0, 1]`` (u to the right,
v down, the top-left pixel's centre at (0.5, 0.5)) to RAS millimetres. Its columns: 0 = RAS step per pixel to the
right, 1 = RAS step per pixel down, 2 = unit slice normal times the slice thickness, 3 = RAS of the image corner
(u, v) = (0, 0).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def pixel_to_ras(m: np.ndarray, u: float, v: float) -> np.ndarray:
    return (np.asarray(m, dtype=float) @ np.array([u, v, 0.0, 1.0]))[:3]


def ras_to_pixel(m: np.ndarray, ras: Sequence[float]) -> Tuple[float, float, float]:
    """(u, v, w): pixel coordinates and the distance from the slice plane in slice thicknesses."""
    p = np.linalg.solve(np.asarray(m, dtype=float), np.array([ras[0], ras[1], ras[2], 1.0]))
    return float(p[0]), float(p[1]), float(p[2])


def slice_axes(m: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Unit vectors (x right, y down, normal = x × y) and the pixel sizes along x and y in mm."""
    m = np.asarray(m, dtype=float)
    ex, ey = m[:3, 0], m[:3, 1]
    sx, sy = float(np.linalg.norm(ex)), float(np.linalg.norm(ey))
    ux, uy = ex / sx, ey / sy
    return ux, uy, np.cross(ux, uy), sx, sy


def box_to_plane_roi(
    m: np.ndarray, box: Sequence[float], thickness_mm: float
) -> Tuple[np.ndarray, Tuple[float, float, float], np.ndarray]:
    """A box in pixels -> (centre RAS, size (w, h, thickness) mm, axes 3x3 with columns x, y, normal)."""
    ux, uy, n, sx, sy = slice_axes(m)
    center = pixel_to_ras(m, (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)
    size = (float((box[2] - box[0]) * sx), float((box[3] - box[1]) * sy), float(thickness_mm))
    return center, size, np.column_stack([ux, uy, n])


def box_corners_ras(m: np.ndarray, box: Sequence[float]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([pixel_to_ras(m, u, v) for u, v in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))])
