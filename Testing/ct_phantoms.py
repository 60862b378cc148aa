"""Lesion phantoms built from the real chest CT: smooth-edged nodules and focal lesions inserted at known positions.

Positions are chosen here from the HU alone with SimpleITK distance maps and max filters (not with the code under
test): a solid or ground-glass nodule goes where lung parenchyma (< -600 HU) surrounds it by 4 mm on every side, a
juxtapleural one touches the lateral chest wall, a focal lesion sits inside the liver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

SPACING = (2.5, 0.703125, 0.703125)  # (slice, row, col) mm of the axial stack


@lru_cache(maxsize=1)
def _stack_cached(path: str) -> np.ndarray:
    import nibabel as nib

    vol = np.asarray(nib.load(path).dataobj, dtype=np.float32)  # (i, j, k), LAS
    return np.ascontiguousarray(np.transpose(vol, (2, 1, 0))[:, ::-1, :])  # (k, row, col), anterior up


def axial_stack(path: Path) -> np.ndarray:
    """The chest CT as axial slices (k, row, col), rows top = anterior, cols left = patient right (radiological):
    exactly what an axial Slicer view of the volume shows at 1 px per voxel. A copy: callers may modify it."""
    return _stack_cached(str(path)).copy()


@dataclass
class Insert:
    kind: str  # "solid", "ground-glass", "juxtapleural", "ellipsoid", "hypodense", "hyperdense"
    center: tuple[float, float, float]  # (slice, row, col) in voxel units (continuous)
    radii_mm: tuple[float, float, float]  # (along slices, rows, cols)
    hu: float

    @property
    def diameter_mm(self) -> float:
        return 2 * self.radii_mm[2]

    def box_on(self, k: int) -> tuple[float, float, float, float] | None:
        """The insert's cross-section on slice k as an [x0, y0, x1, y1] pixel box (None when not cut)."""
        dz = (k - self.center[0]) * SPACING[0] / self.radii_mm[0]
        if abs(dz) >= 1:
            return None
        f = math.sqrt(1 - dz * dz)
        ry, rx = self.radii_mm[1] * f / SPACING[1], self.radii_mm[2] * f / SPACING[2]
        cy, cx = self.center[1] + 0.5, self.center[2] + 0.5
        return (cx - rx, cy - ry, cx + rx, cy + ry)


def insert(stack: np.ndarray, ins: Insert, edge_mm: float = 0.6, seed: int = 0) -> None:
    """Blend a smooth-edged ellipsoid into ``stack`` in place; each slice averages 5 sub-planes over its 2.5 mm
    thickness (partial volume like a real reconstruction), with 12 HU of noise inside the insert."""
    rz, ry, rx = ins.radii_mm
    kz, cy, cx = ins.center
    k0, k1 = max(0, int(kz - rz / SPACING[0]) - 1), min(stack.shape[0], int(kz + rz / SPACING[0]) + 2)
    y0, y1 = max(0, int(cy - ry / SPACING[1]) - 3), min(stack.shape[1], int(cy + ry / SPACING[1]) + 4)
    x0, x1 = max(0, int(cx - rx / SPACING[2]) - 3), min(stack.shape[2], int(cx + rx / SPACING[2]) + 4)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    rng = np.random.default_rng(seed)
    rmin = min(ins.radii_mm)
    for k in range(k0, k1):
        w = np.zeros(yy.shape)
        for sub in np.linspace(-0.4, 0.4, 5):
            dz = (k + sub - kz) * SPACING[0] / rz
            d = np.sqrt(dz**2 + ((yy - cy) * SPACING[1] / ry) ** 2 + ((xx - cx) * SPACING[2] / rx) ** 2)
            w += 0.5 * (1 - np.tanh((d - 1) * rmin / edge_mm)) / 5
        block = stack[k, y0:y1, x0:x1]
        noise = rng.normal(0, 12, size=block.shape)
        stack[k, y0:y1, x0:x1] = block * (1 - w) + (ins.hu + noise) * w


def _sitk(a: np.ndarray, spacing):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(a)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    return img


def lung_clearance(stack: np.ndarray, k0: int, k1: int) -> np.ndarray:
    """For slices k0..k1: the distance in mm from each voxel inside the body's lungs (a hole of ``HU >= -400``,
    filled slice by slice) to the nearest voxel of -600 HU or more after a 1 mm Gaussian (3D distance map); 0 elsewhere."""
    import SimpleITK as sitk

    slab = stack[k0:k1]
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(_sitk(slab, SPACING), 1.0))  # lung noise off
    dense = (smooth >= -600).astype(np.uint8)
    dist = sitk.GetArrayFromImage(
        sitk.SignedMaurerDistanceMap(
            _sitk(dense, SPACING), insideIsPositive=False, squaredDistance=False, useImageSpacing=True
        )
    )
    body = (slab >= -400).astype(np.uint8)
    filled = np.stack([sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(b))) > 0 for b in body])
    inside = filled & (slab < -400)
    return np.where(inside, dist, 0.0).astype(np.float32)


def clean_lung_points(clearance: np.ndarray, k0: int, clear_mm: float) -> np.ndarray:
    """(slice, row, col) voxels with at least ``clear_mm`` of lung parenchyma around them."""
    pts = np.argwhere(clearance >= clear_mm)
    pts[:, 0] += k0
    return pts


def far_apart(points: np.ndarray, n: int, min_mm: float, seed: int = 1) -> list[tuple[int, int, int]]:
    """Up to ``n`` of ``points`` at least ``min_mm`` apart (deterministic)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(points))
    out: list[np.ndarray] = []
    for i in order:
        p = points[i]
        if all(np.linalg.norm((p - q) * np.array(SPACING)) >= min_mm for q in out):
            out.append(p)
            if len(out) == n:
                break
    return [tuple(int(v) for v in p) for p in out]


def pleural_point(stack: np.ndarray, k: int, radius_mm: float, side: str = "image-left") -> tuple[float, float, float]:
    """A centre for a nodule of ``radius_mm`` touching the lateral chest wall on slice k: on the lung's middle row,
    ``radius_mm`` - 0.5 mm in from the outermost lung pixel (so that it sits on the pleura)."""
    sl = stack[k]
    lungish = sl < -600
    w = sl.shape[1]
    half = slice(0, w // 2) if side == "image-left" else slice(w // 2, w)
    rows = np.nonzero(lungish[:, half].sum(axis=1) > 20)[0]
    row = int(np.median(rows))
    cols = np.nonzero(lungish[row, half])[0] + (0 if side == "image-left" else w // 2)
    # the lung run that starts at the body wall: skip air outside the body by taking the run nearest the midline
    body = sl > -400
    if side == "image-left":
        wall = int(np.nonzero(body[row, : w // 2])[0][0])
        first = int(cols[cols > wall + 5][0])
        col = first + (radius_mm - 0.5) / SPACING[2]
    else:
        wall = int(np.nonzero(body[row, w // 2 :])[0][-1]) + w // 2
        last = int(cols[cols < wall - 5][-1])
        col = last - (radius_mm - 0.5) / SPACING[2]
    return (float(k), float(row), float(col))
