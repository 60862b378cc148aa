"""The tissue map of one CT slice, from Hounsfield-unit ranges and connected components.

HU ranges (half-open, ``lo <= HU < hi``; the usual radiological ranges, e.g. fat -190..-30 as in body-composition
work, water-like 0..20 HU for simple fluid):

==================  ================  ====================================================================
class               HU                notes
==================  ================  ====================================================================
air / lung          < -400            inside the body: lung fields, or airway / bowel gas (see below)
partial volume      -400 .. -190      lung-tissue interfaces; counted as "other"
fat                 -190 .. -30
fluid               -30 .. 20         water-like (simple fluid 0..20; -30..0 also holds fat/fluid mixing)
soft tissue         20 .. 100         muscle, unenhanced organs, blood
enhanced / bone     >= 100            contrast-enhanced vessels and organs, calcium, bone (>= 300: "dense")
==================  ================  ====================================================================

Regions:

* **body**: pixels >= -400 HU; the largest connected component plus any component at least
  ``BODY_MIN_FRACTION`` of it (arms), holes filled (so the lungs are inside). The table and the air outside
  are not body.
* **lung fields**: connected components of air (< -400 HU) inside the body of at least ``LUNG_MIN_AREA_MM2``
  whose median is above ``GAS_MEDIAN_MAX_HU``: aerated lung has a median of about -870 HU, while the airway and
  bowel gas are pure air (about -1000 HU) and become "gas" instead, as do smaller air components. Each field is named by the side of the image its centroid lies
  on relative to the body's centroid, in the radiological convention of axial and coronal views (the patient's right
  on the image's left): image-left -> "right lung field", image-right -> "left lung field".
* **closed lung fields**: each lung field closed with a disc of ``LUNG_CLOSING_MM`` radius and its holes filled, so
  that nodules and vessels inside the lung, and nodules on the pleura (juxtapleural) up to about twice that radius,
  lie inside the field.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

AIR_MAX_HU = -400.0
PARTIAL_MAX_HU = -190.0
FAT_RANGE_HU = (-190.0, -30.0)
FLUID_RANGE_HU = (-30.0, 20.0)
SOFT_RANGE_HU = (20.0, 100.0)
ENHANCED_MIN_HU = 100.0
DENSE_MIN_HU = 300.0
GAS_MEDIAN_MAX_HU = -960.0
BODY_MIN_FRACTION = 0.2
LUNG_MIN_AREA_MM2 = 60.0
LUNG_CLOSING_MM = 10.0

#: Tissue class codes of :attr:`TissueMap.classes` and their names.
CLASS_NAMES = {
    0: "outside",
    1: "lung",
    2: "gas",
    3: "other",
    4: "fat",
    5: "fluid",
    6: "soft tissue",
    7: "enhanced/bone",
}
OUTSIDE, LUNG, GAS, OTHER, FAT, FLUID, SOFT, ENHANCED = range(8)

RIGHT_LUNG, LEFT_LUNG = 1, 2  # codes in TissueMap.lung_sides
SIDE_NAMES = {RIGHT_LUNG: "right lung field", LEFT_LUNG: "left lung field"}


@dataclass
class TissueMap:
    spacing: tuple[float, float]  # (row, col) mm
    body: np.ndarray  # bool (H, W), holes filled
    classes: np.ndarray  # uint8 (H, W), codes of CLASS_NAMES
    lung_sides: np.ndarray  # uint8 (H, W): 0, RIGHT_LUNG, LEFT_LUNG (the aerated lung fields)
    lung_closed: np.ndarray  # uint8 (H, W): the same codes after closing over the pleura and filling holes

    @property
    def pixel_area_mm2(self) -> float:
        return float(self.spacing[0] * self.spacing[1])

    @property
    def lung(self) -> np.ndarray:
        return self.lung_sides > 0

    def area_mm2(self, mask: np.ndarray) -> float:
        return float(mask.sum()) * self.pixel_area_mm2


def classify_hu(hu: np.ndarray) -> np.ndarray:
    """HU -> class codes by range alone (no anatomy): air < -400 is LUNG here; :func:`tissue_map` splits it."""
    out = np.full(hu.shape, OTHER, dtype=np.uint8)
    out[hu < AIR_MAX_HU] = LUNG
    out[(hu >= FAT_RANGE_HU[0]) & (hu < FAT_RANGE_HU[1])] = FAT
    out[(hu >= FLUID_RANGE_HU[0]) & (hu < FLUID_RANGE_HU[1])] = FLUID
    out[(hu >= SOFT_RANGE_HU[0]) & (hu < SOFT_RANGE_HU[1])] = SOFT
    out[hu >= ENHANCED_MIN_HU] = ENHANCED
    return out


def _sitk_mask(mask: np.ndarray, spacing: tuple[float, float]):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing((float(spacing[1]), float(spacing[0])))
    return img


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2D mask: (labels int32, count)."""
    import SimpleITK as sitk

    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    labels = sitk.GetArrayFromImage(cc).astype(np.int32)
    return labels, int(labels.max())


def fill_holes(mask: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(mask.astype(np.uint8)))) > 0


def distance_to_mm(mask: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Euclidean distance in mm from every pixel to the nearest pixel of ``mask`` (0 on the mask; SimpleITK
    ``SignedMaurerDistanceMap``, linear in the pixel count). An empty mask gives +inf everywhere."""
    import SimpleITK as sitk

    if not mask.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    d = sitk.SignedMaurerDistanceMap(
        _sitk_mask(mask, spacing), insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return np.maximum(sitk.GetArrayFromImage(d), 0.0).astype(np.float32)


def dilate_mm(mask: np.ndarray, spacing: tuple[float, float], radius_mm: float) -> np.ndarray:
    """``mask`` dilated by a closed disc of ``radius_mm`` (every pixel within that distance of the mask)."""
    return distance_to_mm(mask, spacing) <= radius_mm


def erode_mm(mask: np.ndarray, spacing: tuple[float, float], radius_mm: float) -> np.ndarray:
    """``mask`` eroded by a closed disc of ``radius_mm`` (the pixels farther than that from everything outside;
    the border of the array counts as inside)."""
    return mask & (distance_to_mm(~mask, spacing) > radius_mm)


def close_disc(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float], fill: bool = False) -> np.ndarray:
    """Binary closing with a disc of ``radius_mm`` (a disc in mm, so elliptic in pixels when the spacing is
    anisotropic: dilation then erosion, each a threshold of a Euclidean distance map), then (``fill``) its holes
    filled; computed on the mask's bounding box plus the radius."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return mask.copy()
    ry = int(np.ceil(radius_mm / spacing[0])) + 2
    rx = int(np.ceil(radius_mm / spacing[1])) + 2
    y0, y1 = max(0, ys.min() - ry), min(mask.shape[0], ys.max() + ry + 1)
    x0, x1 = max(0, xs.min() - rx), min(mask.shape[1], xs.max() + rx + 1)
    # pad the crop by the radius so that the erosion does not eat in from the array's border (as for ITK's
    # closing with the "safe border")
    crop = np.pad(mask[y0:y1, x0:x1], ((ry, ry), (rx, rx)))
    closed = erode_mm(dilate_mm(crop, spacing, radius_mm), spacing, radius_mm)[ry:-ry, rx:-rx]
    if fill:
        closed = fill_holes(closed)
    out = np.zeros_like(mask, dtype=bool)
    out[y0:y1, x0:x1] = closed
    return out


def tissue_map(hu: np.ndarray, spacing: tuple[float, float], pool: Executor | None = None) -> TissueMap:
    """The tissue map of one CT slice (see the module docstring for every rule); ``pool``: a thread pool for one of
    the two lung closings (the same map)."""
    hu = np.asarray(hu, dtype=np.float32)
    px_area = float(spacing[0] * spacing[1])
    classes = classify_hu(hu)
    # body
    labels, n = components(hu >= AIR_MAX_HU)
    body = np.zeros(hu.shape, dtype=bool)
    if n:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.nonzero(sizes >= BODY_MIN_FRACTION * sizes.max())[0] + 1
        body = fill_holes(np.isin(labels, keep))
    classes[~body] = OUTSIDE
    # lung fields vs gas
    lung_sides = np.zeros(hu.shape, dtype=np.uint8)
    lung_closed = np.zeros(hu.shape, dtype=np.uint8)
    air_in_body = body & (hu < AIR_MAX_HU)
    labels, n = components(air_in_body)
    if n:
        flat = labels.ravel()
        sizes = np.bincount(flat)
        xs = np.nonzero(body)[1]
        body_cx = float(xs.mean()) if xs.size else hu.shape[1] / 2
        xsum = np.bincount(flat, weights=np.tile(np.arange(hu.shape[1], dtype=np.float64), hu.shape[0]))
        for lab in range(1, n + 1):
            region = labels == lab
            big = sizes[lab] * px_area >= LUNG_MIN_AREA_MM2
            if big and float(np.median(hu[region])) > GAS_MEDIAN_MAX_HU:
                side = RIGHT_LUNG if xsum[lab] / sizes[lab] < body_cx else LEFT_LUNG
                lung_sides[region] = side
            else:
                classes[region] = GAS
        fields = [(side, lung_sides == side) for side in (RIGHT_LUNG, LEFT_LUNG)]
        fields = [(side, f) for side, f in fields if f.any()]
        left = None  # with a pool and both fields, the left one is closed there while the right one is closed here
        if pool is not None and len(fields) == 2:
            left = pool.submit(close_disc, fields[1][1], LUNG_CLOSING_MM, spacing, True)
        for side, f in fields:  # right first: it keeps the pixels both closings reach
            closed = (
                left.result()
                if left is not None and side == LEFT_LUNG
                else close_disc(f, LUNG_CLOSING_MM, spacing, True)
            )
            lung_closed[closed & body & (lung_closed == 0)] = side
    return TissueMap(spacing=spacing, body=body, classes=classes, lung_sides=lung_sides, lung_closed=lung_closed)


def composition(tmap: TissueMap, mask: np.ndarray | None = None) -> dict[str, float]:
    """Percent of each tissue class inside ``mask`` (default: the body), classes with 0 % left out."""
    m = tmap.body if mask is None else mask
    total = int(m.sum())
    if total == 0:
        return {}
    counts = np.bincount(tmap.classes[m].ravel(), minlength=len(CLASS_NAMES))
    return {CLASS_NAMES[c]: 100.0 * counts[c] / total for c in CLASS_NAMES if counts[c]}
