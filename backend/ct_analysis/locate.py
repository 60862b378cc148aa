"""Boxes for the ``ground`` vocabulary (:mod:`.vocabulary`): each labelled with what was measured."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lesions import detect_lesions
from .nodules import detect_nodules
from .tissue import (
    DENSE_MIN_HU,
    FAT,
    FLUID,
    GAS,
    LEFT_LUNG,
    RIGHT_LUNG,
    SIDE_NAMES,
    TissueMap,
    components,
)

CALCIUM_MIN_HU = 130.0
CALCIFICATION_DIAMETER_MM = (1.0, 10.0)
BONE_MIN_AREA_MM2 = 20.0
FLUID_MIN_AREA_MM2 = 50.0
MAX_BOXES = 4


@dataclass
class Located:
    label: str
    box: tuple[float, float, float, float]
    score: float | None = None


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def _components_by_size(mask: np.ndarray, min_px: int) -> list[np.ndarray]:
    labels, n = components(mask)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())
    order = [lab for lab in np.argsort(-sizes) if lab != 0 and sizes[lab] >= min_px]
    return [labels == lab for lab in order]


def _area_text(tmap: TissueMap, mask: np.ndarray) -> str:
    return f"{tmap.area_mm2(mask) / 100:.1f} cm²"


def locate(target: str, hu: np.ndarray, tmap: TissueMap) -> list[Located]:
    px = tmap.pixel_area_mm2
    if target == "lung nodule":
        return [Located(c.label, c.box, c.score) for c in detect_nodules(hu, tmap)]
    if target == "focal lesion":
        return [Located(c.label, c.box, c.score) for c in detect_lesions(hu, tmap)]
    if target in ("right lung", "left lung", "lung"):
        sides = {"right lung": (RIGHT_LUNG,), "left lung": (LEFT_LUNG,), "lung": (RIGHT_LUNG, LEFT_LUNG)}[target]
        out = []
        for side in sides:
            m = tmap.lung_sides == side
            if m.any():
                out.append(Located(f"{SIDE_NAMES[side]} ({_area_text(tmap, m)})", _box(m)))
        return out
    if target == "calcification":
        dense = (hu >= CALCIUM_MIN_HU) & (tmap.lung_closed > 0)
        lo, hi = CALCIFICATION_DIAMETER_MM
        out = []
        for m in _components_by_size(dense, 1):
            d = 2 * np.sqrt(m.sum() * px / np.pi)
            if lo <= d <= hi:
                out.append(Located(f"dense spot in the lung ({d:.0f} mm, max {hu[m].max():.0f} HU)", _box(m)))
        return out[:MAX_BOXES]
    if target in ("bone", "spine"):
        bones = _components_by_size((hu >= DENSE_MIN_HU) & tmap.body, int(np.ceil(BONE_MIN_AREA_MM2 / px)))
        if target == "spine":
            xs = np.nonzero(tmap.body)[1]
            left, right = np.percentile(xs, [100 / 3, 200 / 3]) if xs.size else (0, hu.shape[1])
            mid = [m for m in bones if left <= np.nonzero(m)[1].mean() <= right]
            return (
                [Located(f"midline bone (>= {DENSE_MIN_HU:.0f} HU, {_area_text(tmap, mid[0])})", _box(mid[0]))]
                if mid
                else []
            )
        return [Located(f"bone (>= {DENSE_MIN_HU:.0f} HU, {_area_text(tmap, m)})", _box(m)) for m in bones[:MAX_BOXES]]
    if target == "fat":
        fat = _components_by_size(tmap.classes == FAT, 1)
        return [Located(f"fat (-190..-30 HU, {_area_text(tmap, fat[0])})", _box(fat[0]))] if fat else []
    if target == "fluid":
        fl = _components_by_size(tmap.classes == FLUID, int(np.ceil(FLUID_MIN_AREA_MM2 / px)))
        return [Located(f"fluid density (-30..20 HU, {_area_text(tmap, fl[0])})", _box(fl[0]))] if fl else []
    if target == "air":
        gas = _components_by_size(tmap.classes == GAS, 4)
        return [Located(f"gas inside the body ({_area_text(tmap, m)})", _box(m)) for m in gas[:MAX_BOXES]]
    raise ValueError(f"unknown target {target!r}")
