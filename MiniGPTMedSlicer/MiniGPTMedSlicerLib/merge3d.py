"""Merge 2D detections from a slice sweep into 3D findings (pure Python + numpy; no MRML).

A sweep captures parallel slices that share one in-plane pixel grid: slice ``k`` is the plane at offset
``offset_mm[k]`` along the view normal, and its pixel (u, v) maps to RAS through ``pixel_to_ras[k]``.

Merge rule (documented in docs/volumes.md; thresholds are :class:`MergeOptions`):

1. Walk the swept slices in order. A 2D box joins an open 3D track when the track has a box of the
   **same kind** (the label up to a parenthesised measurement: ``lung nodule candidate (solid, 8 mm, 35 HU)`` is of
   kind ``lung nodule candidate``) on one of the previous ``max_gap + 1`` swept slices and the two boxes **overlap**:
   intersection / area of the smaller box >= ``min_overlap`` (this links a small cap of a sphere to the
   larger section next to it, which IoU would not).
2. When several tracks qualify, the box joins the one with the largest overlap; each track takes at most
   one box per slice (the best-overlapping one); other boxes start new tracks.
3. A track becomes a 3D finding: the in-plane extent is the union of its boxes, the extent along the normal
   runs from the first to the last slice of the track plus half a slice spacing on either side, the score
   is the best 2D score, and the "best slice" is the one with the largest box (among boxes within 5 % of the
   largest, the one nearest the middle of the track).
4. Tracks seen on fewer than ``min_slices`` slices are kept but marked ``isolated``.
5. **Nodule shape rule** (kinds containing "nodule" or "lesion candidate"): a nodule is compact, so its extent along the normal must fit
   its in-plane size; vessels seen in cross-section run on through many slices. With ``d`` the largest in-plane
   diameter of the track (the mean of a box's width and height in mm, largest over its boxes) and ``s`` the swept
   slice spacing, a nodule track is kept only when ``(last - first + 1) x s <= nodule_extent_factor x d + s`` and it
   is seen on at least ``nodule_min_slices`` slices (a single-slice dot is far more often a vessel or noise than a
   nodule; the price: nodules smaller than about two slice spacings can be missed). The finding then reports
   ``diameter_mm`` = d and ``volume_ml`` = sum over its boxes of the inscribed ellipse's area x s.
   The label of a 3D finding is the 2D label of its best slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np


@dataclass
class MergeOptions:
    min_overlap: float = 0.3  # intersection / smaller box area
    max_gap: int = 0  # swept slices a lesion may be missed on and still be one finding
    min_slices: int = 2  # fewer -> marked isolated
    nodule_extent_factor: float = 1.5  # nodule tracks: slices x spacing <= factor x diameter + spacing
    nodule_min_slices: int = 2  # nodule tracks seen on fewer slices are dropped


@dataclass
class SliceDetection:
    """One 2D box on swept slice number ``slice_pos`` (0..n-1 in sweep order)."""

    slice_pos: int
    label: str
    box: Tuple[float, float, float, float]  # pixels of that slice's image
    score: Optional[float] = None


@dataclass
class Finding3D:
    label: str
    slice_positions: List[int]  # swept slice numbers, ascending
    boxes: List[Tuple[float, float, float, float]]  # one per slice position
    scores: List[Optional[float]]
    center_ras: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    size_mm: Tuple[float, float, float] = (0.0, 0.0, 0.0)  # along slice x, slice y, normal
    axes: List[List[float]] = field(default_factory=list)  # 3x3, columns = slice x, slice y, normal (unit)
    best_slice_pos: int = 0
    best_center_ras: Tuple[float, float, float] = (0.0, 0.0, 0.0)  # centre of the box on the best slice
    best_score: Optional[float] = None
    isolated: bool = False
    diameter_mm: Optional[float] = None  # nodule kinds: largest in-plane diameter (rule 5)
    volume_ml: Optional[float] = None  # nodule kinds: sum of inscribed-ellipse areas x slice spacing

    @property
    def first(self) -> int:
        return self.slice_positions[0]

    @property
    def last(self) -> int:
        return self.slice_positions[-1]


def overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection area / area of the smaller box (0 when disjoint)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return float(iw * ih / max(min(area_a, area_b), 1e-9))


def label_kind(label: str) -> str:
    """The kind of a label: the text before a parenthesised measurement, trimmed and lower-cased."""
    return label.split("(", 1)[0].strip().lower()


def is_nodule_kind(label: str) -> bool:
    """Compact-lesion kinds, to which the nodule shape rule (5) applies: nodules and focal lesion candidates."""
    kind = label_kind(label)
    return "nodule" in kind or "lesion candidate" in kind


def link_tracks(detections: Sequence[SliceDetection], options: MergeOptions) -> List[List[SliceDetection]]:
    """Group detections into tracks following the merge rule (steps 1-2)."""
    tracks: List[List[SliceDetection]] = []
    by_pos: dict = {}
    for d in detections:
        by_pos.setdefault(d.slice_pos, []).append(d)
    for pos in sorted(by_pos):
        candidates = []  # (overlap, track index, detection index)
        dets = by_pos[pos]
        for ti, tr in enumerate(tracks):
            last = tr[-1]
            if last.slice_pos >= pos or pos - last.slice_pos > options.max_gap + 1:
                continue
            for di, d in enumerate(dets):
                if label_kind(d.label) != label_kind(last.label):
                    continue
                ov = overlap(last.box, d.box)
                if ov >= options.min_overlap:
                    candidates.append((ov, ti, di))
        used_tracks, used_dets = set(), set()
        for _ov, ti, di in sorted(candidates, key=lambda c: -c[0]):
            if ti in used_tracks or di in used_dets:
                continue
            tracks[ti].append(dets[di])
            used_tracks.add(ti)
            used_dets.add(di)
        for di, d in enumerate(dets):
            if di not in used_dets:
                tracks.append([d])
    return tracks


def merge_detections(
    detections: Sequence[SliceDetection],
    pixel_to_ras: Sequence[np.ndarray],
    slice_spacing_mm: float,
    options: Optional[MergeOptions] = None,
) -> List[Finding3D]:
    """Merge 2D detections into 3D findings. ``pixel_to_ras[k]`` is the 4x4 of swept slice ``k`` (continuous PNG
    pixel coordinates [u, v, 0, 1] -> RAS); ``slice_spacing_mm`` is the distance between swept slices."""
    options = options or MergeOptions()
    out: List[Finding3D] = []
    for tr in link_tracks(detections, options):
        boxes = [(float(d.box[0]), float(d.box[1]), float(d.box[2]), float(d.box[3])) for d in tr]
        positions = [d.slice_pos for d in tr]
        scores = [d.score for d in tr]
        first = np.asarray(pixel_to_ras[positions[0]], dtype=float)
        last = np.asarray(pixel_to_ras[positions[-1]], dtype=float)
        ex, ey = first[:3, 0], first[:3, 1]  # mm per pixel along u and v
        sx, sy = float(np.linalg.norm(ex)), float(np.linalg.norm(ey))
        ux, uy = ex / sx, ey / sy
        normal = np.cross(ux, uy)
        step = last[:3, 3] - first[:3, 3]
        if len(positions) > 1 and float(np.dot(step, normal)) < 0:
            normal = -normal  # make the normal point from the first to the last slice
        u0 = min(b[0] for b in boxes)
        v0 = min(b[1] for b in boxes)
        u1 = max(b[2] for b in boxes)
        v1 = max(b[3] for b in boxes)
        mid_first = first @ np.array([(u0 + u1) / 2, (v0 + v1) / 2, 0.0, 1.0])
        depth = float(np.dot(step, normal))
        center = mid_first[:3] + normal * depth / 2
        size = ((u1 - u0) * sx, (v1 - v0) * sy, abs(depth) + slice_spacing_mm)
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
        # largest box; among near-ties (within 5 %), the one nearest the middle of the track
        mid = (positions[0] + positions[-1]) / 2
        near_max = [i for i, a in enumerate(areas) if a >= 0.95 * max(areas)]
        best = min(near_max, key=lambda i: abs(positions[i] - mid))
        bb = boxes[best]
        best_c = np.asarray(pixel_to_ras[positions[best]], dtype=float) @ np.array(
            [(bb[0] + bb[2]) / 2, (bb[1] + bb[3]) / 2, 0.0, 1.0]
        )
        valid_scores = [s for s in scores if s is not None and math.isfinite(s)]
        diameter = volume = None
        if is_nodule_kind(tr[0].label):
            diameter = max(((b[2] - b[0]) * sx + (b[3] - b[1]) * sy) / 2 for b in boxes)
            if (
                positions[-1] - positions[0] + 1
            ) * slice_spacing_mm > options.nodule_extent_factor * diameter + slice_spacing_mm:
                continue  # runs on through the slices: a vessel, not a nodule
            if len(positions) < options.nodule_min_slices:
                continue
            volume = sum(math.pi / 4 * (b[2] - b[0]) * sx * (b[3] - b[1]) * sy for b in boxes) * slice_spacing_mm / 1000
        out.append(
            Finding3D(
                label=tr[best].label,
                slice_positions=positions,
                boxes=boxes,
                scores=scores,
                center_ras=(float(center[0]), float(center[1]), float(center[2])),
                size_mm=size,
                axes=np.column_stack([ux, uy, normal]).tolist(),
                best_slice_pos=positions[best],
                best_center_ras=(float(best_c[0]), float(best_c[1]), float(best_c[2])),
                best_score=max(valid_scores) if valid_scores else None,
                isolated=len(positions) < options.min_slices,
                diameter_mm=diameter,
                volume_ml=volume,
            )
        )
    out.sort(key=lambda f: (f.isolated, -(f.best_score or 0.0), -len(f.slice_positions)))
    return out
