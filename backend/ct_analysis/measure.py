"""Region measurements: what ``identify`` reports for a box, on HU (CT) or on raw intensities (anything else).

* value statistics over the pixels whose centres lie inside the box: mean, SD (population), min, max;
* on CT, the tissue composition of those pixels (percent per class of :mod:`.tissue`);
* the box's area and size in mm (or pixels when the spacing is unknown);
* the long and short axis of the **object at the box centre**: the connected component, inside the box, of the
  centre pixel's tissue class (CT) or of pixels within 1 SD of the centre's 3x3 median (other images); the axes of its
  equivalent ellipse (second moments, as SimpleITK's ``EquivalentEllipsoidDiameter``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .tissue import CLASS_NAMES, TissueMap, components


def axes_mm(region: np.ndarray, spacing: tuple[float, float], origin: tuple[int, int] = (0, 0)) -> tuple[float, float]:
    """Long and short axis (mm) of the region's equivalent ellipse (second moments of its pixels, each pixel a
    uniform square). ``origin``: where ``region`` (a crop) starts in the slice, so that a crop gives the slice's own
    figures to the last bit."""
    ys, xs = np.nonzero(region)
    ys, xs = ys + origin[0], xs + origin[1]
    pts = np.stack([ys * spacing[0], xs * spacing[1]]).astype(np.float64)
    cov = np.cov(pts, bias=True) if ys.size > 1 else np.zeros((2, 2))
    cov = cov + np.diag([spacing[0] ** 2 / 12, spacing[1] ** 2 / 12])
    ev = np.linalg.eigvalsh(cov)
    return float(4 * math.sqrt(max(ev[1], 0.0))), float(4 * math.sqrt(max(ev[0], 0.0)))


def compact_axes(
    region: np.ndarray,
    spacing: tuple[float, float],
    diameter_range_mm: tuple[float, float],
    max_elongation: float,
    origin: tuple[int, int] = (0, 0),
) -> tuple[float, float, float] | None:
    """The shape test of the candidate detectors: (long axis, short axis, mean diameter) in mm of the region's
    equivalent ellipse when its mean diameter ((long + short) / 2) lies in ``diameter_range_mm`` and its elongation
    (long / short) is at most ``max_elongation``; None otherwise."""
    long_mm, short_mm = axes_mm(region, spacing, origin)
    diameter = (long_mm + short_mm) / 2
    if not (diameter_range_mm[0] <= diameter <= diameter_range_mm[1]):
        return None
    if long_mm > max_elongation * max(short_mm, 1e-6):
        return None
    return long_mm, short_mm, diameter


@dataclass
class RegionMeasurement:
    unit: str  # "HU" or "raw"
    n_pixels: int
    mean: float
    sd: float
    min: float
    max: float
    width: float  # mm when spacing known, else px
    height: float
    area: float  # mm² or px²
    length_unit: str  # "mm" or "px"
    object_class: str  # tissue class at the centre (CT) or "object"
    object_long_axis: float
    object_short_axis: float
    object_area: float
    composition: dict[str, float] = field(default_factory=dict)  # CT only: percent per class

    def text(self) -> str:
        u, lu = self.unit, self.length_unit
        parts = [
            f"{self.width:.1f} × {self.height:.1f} {lu} region ({self.area:.0f} {lu}², {self.n_pixels} pixels): "
            f"mean {self.mean:.0f} {u}, SD {self.sd:.0f}, min {self.min:.0f}, max {self.max:.0f}."
        ]
        if self.composition:
            comp = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(self.composition.items(), key=lambda kv: -kv[1]))
            parts.append(f"Composition: {comp}.")
        parts.append(
            f"The {self.object_class} at its centre: long axis {self.object_long_axis:.1f} {lu}, short axis "
            f"{self.object_short_axis:.1f} {lu}, area {self.object_area:.0f} {lu}²."
        )
        return " ".join(parts)


def box_mask(shape: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Pixels whose centres (j + 0.5, i + 0.5) lie inside [x0, x1) x [y0, y1); at least the pixel under the centre."""
    x0, y0, x1, y1 = box
    h, w = shape
    j0, j1 = max(0, math.ceil(x0 - 0.5)), min(w, math.ceil(x1 - 0.5))
    i0, i1 = max(0, math.ceil(y0 - 0.5)), min(h, math.ceil(y1 - 0.5))
    m = np.zeros(shape, dtype=bool)
    if j1 <= j0 or i1 <= i0:
        cj = min(w - 1, max(0, int((x0 + x1) / 2)))
        ci = min(h - 1, max(0, int((y0 + y1) / 2)))
        m[ci, cj] = True
    else:
        m[i0:i1, j0:j1] = True
    return m


def measure_region(
    values: np.ndarray,
    box: tuple[float, float, float, float],
    spacing: tuple[float, float] | None,
    tmap: TissueMap | None = None,
    unit: str = "HU",
) -> RegionMeasurement:
    values = np.asarray(values, dtype=np.float64)
    inside = box_mask(values.shape, box)
    v = values[inside]
    sp = spacing if spacing is not None else (1.0, 1.0)
    lu = "mm" if spacing is not None else "px"
    ys, xs = np.nonzero(inside)
    width = (xs.max() - xs.min() + 1) * sp[1]
    height = (ys.max() - ys.min() + 1) * sp[0]
    ci = int(np.clip(round((box[1] + box[3]) / 2 - 0.5), ys.min(), ys.max()))
    cj = int(np.clip(round((box[0] + box[2]) / 2 - 0.5), xs.min(), xs.max()))
    composition: dict[str, float] = {}
    if tmap is not None:
        cls = tmap.classes[inside]
        counts = np.bincount(cls, minlength=len(CLASS_NAMES))
        composition = {CLASS_NAMES[c]: 100.0 * counts[c] / cls.size for c in CLASS_NAMES if counts[c]}
        obj_class = CLASS_NAMES[int(tmap.classes[ci, cj])]
        same = (tmap.classes == tmap.classes[ci, cj]) & inside
    else:
        obj_class = "object"
        c = float(np.median(values[max(0, ci - 1) : ci + 2, max(0, cj - 1) : cj + 2]))
        sd = float(v.std()) or 1.0
        same = (np.abs(values - c) <= sd) & inside
    labels, _ = components(same)
    obj = labels == labels[ci, cj] if same[ci, cj] else np.zeros_like(same)
    if not obj.any():
        obj[ci, cj] = True
    long_ax, short_ax = axes_mm(obj, sp)
    return RegionMeasurement(
        unit=unit,
        n_pixels=int(v.size),
        mean=float(v.mean()),
        sd=float(v.std()),
        min=float(v.min()),
        max=float(v.max()),
        width=float(width),
        height=float(height),
        area=float(v.size * sp[0] * sp[1]),
        length_unit=lu,
        object_class=obj_class,
        object_long_axis=long_ax,
        object_short_axis=short_ax,
        object_area=float(obj.sum() * sp[0] * sp[1]),
        composition=composition,
    )
