"""Focal hypodense / hyperdense lesion candidates inside solid soft-tissue organs of one CT slice.

Only where the contrast to the surrounding organ is real (constants below):

1. **Organs**: the HU image smoothed with a Gaussian of ``SMOOTH_MM`` (SimpleITK ``SmoothingRecursiveGaussian``);
   connected components of ``ORGAN_RANGE_HU`` inside the body and outside the closed lung fields, of at least
   ``ORGAN_MIN_AREA_MM2`` (liver, spleen, kidneys, large muscles, the myocardium), holes filled (a cyst inside an
   organ is part of it). The organ level is the median smoothed HU of the component, its spread the robust SD
   (1.4826 MAD) of the smoothed HU around that level (texture and heterogeneity, not pixel noise).
2. **Candidates**: inside the organ eroded by ``EDGE_MM`` (not its rim, where fat or bone begins), connected parts
   where the smoothed HU differs from the organ level by at least ``max(MIN_CONTRAST_HU, NOISE_FACTOR x noise)``:
   darker -> hypodense, brighter -> hyperdense. Mean HU from ``LESION_MIN_HU`` (below: fat or fat partial volume)
   to ``HYPER_MAX_HU`` (above: contrast-filled vessels, calcium, bone).
3. **Shape**: mean diameter (long + short axis of the equivalent ellipse, / 2) in ``DIAMETER_RANGE_MM``, elongation
   <= ``MAX_ELONGATION`` (vessels in-plane are tubes), and at least ``MIN_ORGAN_RING`` of a ring of ``RING_MM``
   around it in the organ (a focal lesion is surrounded by its organ; a vessel entering the organ or a fat cleft at
   its edge is not).

``score = contrast / (contrast + SCORE_HALF_HU)`` with contrast the |mean HU - organ level|: a documented measure, not
a probability. Labels: ``focal hypodense lesion candidate (14 mm, 48 HU vs 104 HU)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .measure import compact_axes
from .tissue import TissueMap, components, dilate_mm, erode_mm, fill_holes

SMOOTH_MM = 1.5
ORGAN_RANGE_HU = (20.0, 250.0)
ORGAN_MIN_AREA_MM2 = 2500.0
EDGE_MM = 3.0
MIN_CONTRAST_HU = 40.0
NOISE_FACTOR = 2.5
LESION_MIN_HU = -10.0
HYPER_MAX_HU = 200.0
DIAMETER_RANGE_MM = (6.0, 30.0)
MAX_ELONGATION = 1.6
RING_MM = 3.0
MIN_ORGAN_RING = 0.9
SCORE_HALF_HU = 40.0
MAX_CANDIDATES = 4


@dataclass
class LesionCandidate:
    box: tuple[float, float, float, float]
    center: tuple[float, float]
    polarity: str  # "hypodense" / "hyperdense"
    diameter_mm: float
    long_axis_mm: float
    short_axis_mm: float
    mean_hu: float
    organ_hu: float

    @property
    def contrast_hu(self) -> float:
        return abs(self.mean_hu - self.organ_hu)

    @property
    def score(self) -> float:
        return round(self.contrast_hu / (self.contrast_hu + SCORE_HALF_HU), 4)

    @property
    def label(self) -> str:
        return (
            f"focal {self.polarity} lesion candidate ({self.diameter_mm:.0f} mm, {self.mean_hu:.0f} HU vs "
            f"{self.organ_hu:.0f} HU)"
        )


def _smooth(hu: np.ndarray, spacing: tuple[float, float], sigma_mm: float) -> np.ndarray:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(hu, dtype=np.float32))
    img.SetSpacing((float(spacing[1]), float(spacing[0])))
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, sigma_mm))


def detect_lesions(hu: np.ndarray, tmap: TissueMap) -> list[LesionCandidate]:
    spacing = tmap.spacing
    px_area = spacing[0] * spacing[1]
    hu = np.asarray(hu, dtype=np.float32)
    sm = _smooth(hu, spacing, SMOOTH_MM)
    organ_px = (sm >= ORGAN_RANGE_HU[0]) & (sm < ORGAN_RANGE_HU[1]) & tmap.body & (tmap.lung_closed == 0)
    labels, n = components(organ_px)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())
    out: list[LesionCandidate] = []
    H, W = hu.shape
    # a candidate's ring, on its bounding box plus the ring's width
    py, px = int(math.ceil(RING_MM / spacing[0])) + 1, int(math.ceil(RING_MM / spacing[1])) + 1
    for lab in np.nonzero(sizes * px_area >= ORGAN_MIN_AREA_MM2)[0]:
        if lab == 0:
            continue
        # the organ's bounding box plus (inside the slice) the ring's width of background: the hole filling, the
        # erosion and the rings give there exactly what they give on the whole slice (everything outside the box is
        # background connected to the slice's border; a side on the slice's border stays a border)
        whole = labels == lab
        rows, cols = np.nonzero(whole.any(axis=1))[0], np.nonzero(whole.any(axis=0))[0]
        r0, r1 = max(0, int(rows[0]) - py), min(H, int(rows[-1]) + py + 1)
        c0, c1 = max(0, int(cols[0]) - px), min(W, int(cols[-1]) + px + 1)
        organ = whole[r0:r1, c0:c1]
        sm_o, hu_o = sm[r0:r1, c0:c1], hu[r0:r1, c0:c1]
        inside = sm_o[organ]
        level = float(np.median(inside))
        noise = 1.4826 * float(np.median(np.abs(inside - level)))
        delta = max(MIN_CONTRAST_HU, NOISE_FACTOR * noise)
        filled = fill_holes(organ)
        inner = erode_mm(filled, spacing, EDGE_MM)
        for polarity, cand in (
            ("hypodense", inner & (sm_o <= level - delta)),
            ("hyperdense", inner & (sm_o >= level + delta)),
        ):
            clabels, cn = components(cand)
            for c in range(1, cn + 1):
                region = clabels == c
                area = float(region.sum() * px_area)
                if area < math.pi / 4 * DIAMETER_RANGE_MM[0] ** 2:
                    continue
                shape = compact_axes(region, spacing, DIAMETER_RANGE_MM, MAX_ELONGATION, (r0, c0))
                if shape is None:
                    continue
                long_mm, short_mm, diameter = shape
                mean_hu = float(hu_o[region].mean())
                if mean_hu < LESION_MIN_HU or mean_hu > HYPER_MAX_HU:
                    continue
                ys, xs = np.nonzero(region)
                a0, a1 = max(0, ys.min() - py), min(region.shape[0], ys.max() + py + 1)
                b0, b1 = max(0, xs.min() - px), min(region.shape[1], xs.max() + px + 1)
                sub = region[a0:a1, b0:b1]
                ring = dilate_mm(sub, spacing, RING_MM) & ~sub
                if float(filled[a0:a1, b0:b1][ring].mean()) < MIN_ORGAN_RING:
                    continue
                ys, xs = ys + r0, xs + c0  # slice coordinates
                out.append(
                    LesionCandidate(
                        box=(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
                        center=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
                        polarity=polarity,
                        diameter_mm=diameter,
                        long_axis_mm=long_mm,
                        short_axis_mm=short_mm,
                        mean_hu=mean_hu,
                        organ_hu=level,
                    )
                )
    out.sort(key=lambda c: c.score, reverse=True)
    return out[:MAX_CANDIDATES]
