"""Lung nodule candidates on one CT slice: multiscale blobs inside the (closed) lung fields, with shape tests.

Classical computer-aided detection, in five steps (constants below):

1. **Input**: HU clipped to ``[-1000, CLIP_MAX_HU]`` inside the closed lung fields (:mod:`.tissue`: closed over the
   pleura so that juxtapleural nodules are inside), -1000 everywhere else, so that the chest wall, mediastinum and
   bone cannot form blobs and a nodule on the pleura stands out on its own.
2. **Blob measure**: the scale-normalised Laplacian of Gaussian (SimpleITK ``LaplacianRecursiveGaussian`` with
   ``NormalizeAcrossScale``), negated, at sigma = r / sqrt(2) for the radii ``BLOB_RADII_MM``; its maximum over
   scales, ``R`` (in HU: a disc of contrast C gives about 0.74 C at its own scale). Candidates are the local maxima
   of ``R`` of at least ``MIN_RESPONSE_HU`` inside the aerated or closed lung.
3. **Region**: the connected part of ``HU >= t`` containing the maximum, inside the closed lung field and within a
   disc of ``WINDOW_FACTOR`` x the blob radius; core = median HU within half the blob radius of the maximum (a core
   above ``MAX_CORE_HU`` is contrast-enhanced: a vessel, skipped), lung background = median HU of the aerated lung.
   Solid cores (>= ``SOLID_MIN_HU``): t = (``SOLID_MIN_HU`` + background) / 2. Ground-glass cores (from
   ``GGO_MIN_CORE_HU``, with ``R >= GGO_MIN_RESPONSE_HU``): t = the value of ``GGO_THRESHOLDS_HU`` nearest to
   (core + background) / 2 (one labelling per threshold and slice, not one per candidate).
4. **Shape tests**, which reject vessels (tubes: elongated in-plane, or running out of the window), fissures (thin
   lines) and the pleural surface or mediastinum taken in by the closing:

   * mean diameter (long + short axis of the equivalent ellipse, / 2) in ``DIAMETER_RANGE_MM``;
   * elongation (long / short axis) <= ``MAX_ELONGATION``;
   * at most ``MAX_RIM_FRACTION`` of the region's pixels on the window's rim (it does not run on);
   * at least ``MIN_LUNG_CONTACT`` of a 1-pixel ring around the region lies in aerated lung (a nodule is surrounded
     by lung, a juxtapleural one at least on one side);
   * core HU (mean of the region eroded by one pixel) <= ``MAX_CORE_HU`` (brighter: a contrast-enhanced vessel seen
     in cross-section; a solid nodule reads about -100..+60 HU and enhances by some 20 HU, a calcified one is benign and
     left to "calcification"); at most ``MAX_FAT_FRACTION`` of its pixels in the fat range and, from
     ``FAT_CORE_MIN_MM`` on, a core median outside it (fat at the mediastinum or diaphragm taken in by the closing;
     smaller regions are exempt because a nodule's partial-volume edge slices read in the fat range too);
   * Hessian blob objectness (SimpleITK ``ObjectnessMeasure``, object dimension 0, bright, on the image smoothed at
     the blob scale) at the maximum >= ``MIN_OBJECTNESS`` (a line scores near 0, a disc near 1).

5. **Type** (from the HU inside the region): *solid* when at least ``SOLID_FRACTION`` of its pixels are >=
   ``SOLID_MIN_HU``; *part-solid* when some (>= ``PART_SOLID_FRACTION``) are; *ground-glass* otherwise.

Each candidate reports its mean diameter, its core HU (mean HU of the region eroded by one pixel, or of the region
when that is empty) and ``score = R / (R + SCORE_HALF_HU)``: a monotone, documented measure of blob contrast (0.5 at
``SCORE_HALF_HU``), not a probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .measure import compact_axes
from .tissue import FAT_RANGE_HU, TissueMap

CLIP_MAX_HU = 100.0
BLOB_RADII_MM = (2.25, 3.4, 5.0, 7.5, 11.0, 15.0)
MIN_RESPONSE_HU = 110.0
WINDOW_FACTOR = 2.0
DIAMETER_RANGE_MM = (4.0, 30.0)
MAX_ELONGATION = 1.5
MAX_RIM_FRACTION = 0.05
MIN_LUNG_CONTACT = 0.4
MIN_OBJECTNESS = 0.5
MAX_CORE_HU = 100.0
MAX_FAT_FRACTION = 0.5
FAT_CORE_MIN_MM = 10.0
GGO_MIN_CORE_HU = -750.0
GGO_MIN_RESPONSE_HU = 150.0
GGO_THRESHOLDS_HU = (-775.0, -700.0, -625.0)
SOLID_MIN_HU = -300.0
SOLID_FRACTION = 0.5
PART_SOLID_FRACTION = 0.1
SCORE_HALF_HU = 200.0
MAX_CANDIDATES = 8


@dataclass
class NoduleCandidate:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 pixels (exclusive end)
    center: tuple[float, float]  # x, y pixels (centroid of the region)
    kind: str  # "solid", "part-solid", "ground-glass"
    diameter_mm: float  # (long + short axis) / 2
    long_axis_mm: float
    short_axis_mm: float
    area_mm2: float
    core_hu: float
    response_hu: float  # R at the maximum
    objectness: float
    side: str  # "right lung field" / "left lung field"

    @property
    def score(self) -> float:
        return round(self.response_hu / (self.response_hu + SCORE_HALF_HU), 4)

    @property
    def label(self) -> str:
        return f"lung nodule candidate ({self.kind}, {self.diameter_mm:.0f} mm, {self.core_hu:.0f} HU)"


def _image(a: np.ndarray, spacing: tuple[float, float]):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))
    img.SetSpacing((float(spacing[1]), float(spacing[0])))
    return img


def blob_response(x: np.ndarray, spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(R, scale index): the negated scale-normalised LoG, maximised over ``BLOB_RADII_MM``. Scales of at least 3
    pixels run on the image binned 2x2 (4x4 from 7 pixels; SimpleITK ``BinShrink``) and are expanded back with
    linear interpolation (``Expand``): the same measure at a fraction of the cost."""
    import SimpleITK as sitk

    img = _image(x, spacing)
    shrunk = {1: img}
    best = np.full(x.shape, -np.inf, dtype=np.float32)
    idx = np.zeros(x.shape, dtype=np.int8)
    log = sitk.LaplacianRecursiveGaussianImageFilter()
    log.SetNormalizeAcrossScale(True)
    for i, r in enumerate(BLOB_RADII_MM):
        sigma = r / math.sqrt(2.0)
        sigma_px = sigma / min(spacing)
        f = 4 if sigma_px >= 7 else 2 if sigma_px >= 3 else 1
        if f not in shrunk:
            shrunk[f] = sitk.BinShrink(img, [f, f])
        log.SetSigma(sigma)
        out = log.Execute(shrunk[f])
        if f > 1:
            out = sitk.Expand(out, [f, f], sitk.sitkLinear)
        a = -sitk.GetArrayFromImage(out)
        resp = np.full(x.shape, -np.inf, dtype=np.float32)
        hh, ww = min(a.shape[0], x.shape[0]), min(a.shape[1], x.shape[1])
        # Expand's grid starts half a bin before the first pixel: shift by (f - 1) / 2 pixels
        sh = (f - 1) // 2
        resp[: hh - sh, : ww - sh] = a[sh:hh, sh:ww]
        better = resp > best
        best[better] = resp[better]
        idx[better] = i
    return best, idx


def _local_maxima(r: np.ndarray, allowed: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pixels of ``allowed`` with ``r >= threshold`` that are the maximum of their 5 x 5 neighbourhood, strongest
    first (the neighbourhood is read only around those pixels)."""
    ys, xs = np.nonzero(allowed & (r >= threshold))
    if ys.size == 0:
        return []
    p = np.pad(r, 2, constant_values=-np.inf)
    vals = r[ys, xs]
    peak = np.ones(ys.size, dtype=bool)
    for dy in range(5):
        for dx in range(5):
            peak &= vals >= p[ys + dy, xs + dx]
    ys, xs, vals = ys[peak], xs[peak], vals[peak]
    order = np.argsort(-vals, kind="stable")
    return [(int(ys[i]), int(xs[i])) for i in order]


def _objectness(x: np.ndarray, spacing: tuple[float, float], sigma_mm: float, y: int, xc: int) -> float:
    import SimpleITK as sitk

    half = int(math.ceil(4 * sigma_mm / min(spacing))) + 2
    y0, y1 = max(0, y - half), min(x.shape[0], y + half + 1)
    x0, x1 = max(0, xc - half), min(x.shape[1], xc + half + 1)
    patch = _image(x[y0:y1, x0:x1], spacing)
    smooth = sitk.SmoothingRecursiveGaussian(patch, sigma_mm)
    obj = sitk.ObjectnessMeasureImageFilter()
    obj.SetObjectDimension(0)
    obj.SetBrightObject(True)
    obj.SetScaleObjectnessMeasure(False)
    obj.SetGamma(5.0)
    out = sitk.GetArrayFromImage(obj.Execute(smooth))
    return float(out[y - y0, xc - x0])


def _shift_or(m: np.ndarray) -> np.ndarray:
    """m dilated by one pixel (8-neighbourhood)."""
    p = np.pad(m, 1)
    out = np.zeros_like(m)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= p[dy : dy + m.shape[0], dx : dx + m.shape[1]]
    return out


def _erode(m: np.ndarray) -> np.ndarray:
    return ~_shift_or(~m)


def detect_nodules(hu: np.ndarray, tmap: TissueMap) -> list[NoduleCandidate]:
    """Lung nodule candidates of one slice, strongest first (at most ``MAX_CANDIDATES``)."""
    from .tissue import components

    spacing = tmap.spacing
    closed = tmap.lung_closed > 0
    if not closed.any():
        return []
    ys, xs = np.nonzero(closed)
    pad = int(math.ceil(2 * BLOB_RADII_MM[-1] / min(spacing)))
    y0, y1 = max(0, ys.min() - pad), min(hu.shape[0], ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(hu.shape[1], xs.max() + pad + 1)
    h = np.asarray(hu[y0:y1, x0:x1], dtype=np.float32)
    cl = closed[y0:y1, x0:x1]
    lung = tmap.lung_sides[y0:y1, x0:x1] > 0
    sides = tmap.lung_closed[y0:y1, x0:x1]
    x = np.where(cl, np.clip(h, -1000.0, CLIP_MAX_HU), -1000.0).astype(np.float32)
    resp, scale_idx = blob_response(x, spacing)
    lung_bg = float(np.median(h[lung])) if lung.any() else -850.0
    solid_labels, _ = components(x >= (SOLID_MIN_HU + lung_bg) / 2)
    ggo_labels: dict[float, np.ndarray] = {}
    taken = np.zeros(cl.shape, dtype=bool)
    out: list[NoduleCandidate] = []
    px_area = spacing[0] * spacing[1]
    templates: dict[int, tuple[int, int, np.ndarray]] = {}  # per scale: the window's half sizes and distances (mm)
    for py, px in _local_maxima(resp, cl, MIN_RESPONSE_HU):
        if taken[py, px]:
            continue
        s_i = int(scale_idx[py, px])
        r_mm = BLOB_RADII_MM[s_i]
        win = WINDOW_FACTOR * r_mm + 1.5 * max(spacing)
        if s_i not in templates:
            wy, wx = int(math.ceil(win / spacing[0])), int(math.ceil(win / spacing[1]))
            oy, ox = np.mgrid[-wy : wy + 1, -wx : wx + 1]
            templates[s_i] = (wy, wx, np.hypot(oy * spacing[0], ox * spacing[1]))
        wy, wx, full = templates[s_i]
        a0, a1 = max(0, py - wy), min(h.shape[0], py + wy + 1)
        b0, b1 = max(0, px - wx), min(h.shape[1], px + wx + 1)
        dist = full[a0 - py + wy : a1 - py + wy, b0 - px + wx : b1 - px + wx]  # the window, cut at the crop's edges
        disc = dist <= win
        hv = h[a0:a1, b0:b1]
        core = float(np.median(hv[dist <= max(r_mm / 2, max(spacing))]))
        if core > MAX_CORE_HU:  # contrast-enhanced: a vessel (or calcium, left to "calcification")
            continue
        if core >= SOLID_MIN_HU:
            lab = solid_labels[a0:a1, b0:b1]
            region = (lab == lab[py - a0, px - b0]) & disc & (lab > 0)
        elif core >= GGO_MIN_CORE_HU and resp[py, px] >= GGO_MIN_RESPONSE_HU:
            # ground-glass: the threshold of GGO_THRESHOLDS_HU nearest halfway between its core and the lung
            t = min(GGO_THRESHOLDS_HU, key=lambda v: abs(v - (core + lung_bg) / 2))
            if t not in ggo_labels:
                ggo_labels[t] = components(x >= t)[0]
            lab = ggo_labels[t][a0:a1, b0:b1]
            region = (lab == lab[py - a0, px - b0]) & disc & (lab > 0)
        else:
            continue
        n = int(region.sum())
        if n < 3:
            continue
        taken[a0:a1, b0:b1] |= region
        rim = disc & (dist > win - 1.5 * max(spacing))
        if (region & rim).sum() > MAX_RIM_FRACTION * n:
            continue
        ring = _shift_or(region) & ~region
        if ring.any() and float(lung[a0:a1, b0:b1][ring].mean()) < MIN_LUNG_CONTACT:
            continue
        shape = compact_axes(region, spacing, DIAMETER_RANGE_MM, MAX_ELONGATION)
        if shape is None:
            continue
        long_mm, short_mm, diameter = shape
        vals = hv[region]
        inner = _erode(region)
        core_hu = float(hv[inner].mean()) if inner.any() else float(vals.mean())
        if core_hu > MAX_CORE_HU:
            continue
        core_median = float(np.median(hv[inner])) if inner.any() else float(np.median(vals))
        fat_core = diameter >= FAT_CORE_MIN_MM and FAT_RANGE_HU[0] <= core_median < FAT_RANGE_HU[1]
        if fat_core or float(np.mean((vals >= FAT_RANGE_HU[0]) & (vals < FAT_RANGE_HU[1]))) > MAX_FAT_FRACTION:
            continue  # fat (pericardial, at the diaphragm) taken in by the closing, not a nodule
        objectness = _objectness(x, spacing, r_mm / math.sqrt(2.0), py, px)
        if objectness < MIN_OBJECTNESS:
            continue
        solid = float(np.mean(vals >= SOLID_MIN_HU))
        kind = "solid" if solid >= SOLID_FRACTION else "part-solid" if solid >= PART_SOLID_FRACTION else "ground-glass"
        rys, rxs = np.nonzero(region)
        rys, rxs = rys + a0, rxs + b0
        side_code = int(np.bincount(sides[a0:a1, b0:b1][region], minlength=3)[1:].argmax()) + 1
        out.append(
            NoduleCandidate(
                box=(
                    float(rxs.min() + x0),
                    float(rys.min() + y0),
                    float(rxs.max() + 1 + x0),
                    float(rys.max() + 1 + y0),
                ),
                center=(float(rxs.mean() + x0 + 0.5), float(rys.mean() + y0 + 0.5)),
                kind=kind,
                diameter_mm=diameter,
                long_axis_mm=long_mm,
                short_axis_mm=short_mm,
                area_mm2=float(n * px_area),
                core_hu=core_hu,
                response_hu=float(resp[py, px]),
                objectness=objectness,
                side="right lung field" if side_code == 1 else "left lung field",
            )
        )
        if len(out) >= MAX_CANDIDATES:
            break
    return out
