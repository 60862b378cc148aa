"""Capture what a slice view shows: the background volume resliced at the view's geometry (oblique included),
windowed with the volume's current window/level, as PNG bytes plus the exact pixel -> RAS transform.

Works with a slice logic from the Slicer app (``layoutManager().sliceWidget('Red').sliceLogic()``) and with one made
by :mod:`.scene` on ``slicer-core``. Only pixels, pixel spacing, modality and the slice's scalar values are ever put in
a request.

The scalar values (``AnalyzeRequest.values``) are the same reslice before windowing: the volume's real voxel values
(HU on CT), on exactly the image's pixel grid, as a 16-bit PNG with ``slope``/``intercept`` (see
:func:`encode_values`). They are sent for CT (unit "HU") and MR (unit "raw", with the volume's min/max).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import numpy as np

from . import protocol
from .geometry import ras_to_pixel
from .png import encode_png

if TYPE_CHECKING:  # Slicer's MRML classes (the app's or slicer-core's); without stubs, mypy sees them as Any
    from slicer import vtkMRMLMarkupsROINode, vtkMRMLSliceLogic, vtkMRMLSliceNode, vtkMRMLVolumeNode


@dataclass
class CapturedSlice:
    pixels: np.ndarray  # (H, W) uint8, top row first: exactly what is sent
    png: bytes
    pixel_to_ras: np.ndarray  # 4x4: [u, v, 0, 1] (PNG pixel coords, centres at +0.5) -> RAS
    pixel_spacing_mm: Tuple[float, float]  # (row, col)
    slice_normal_ras: Tuple[float, float, float]
    slice_thickness_mm: float
    view_name: str
    orientation: str
    slice_offset_mm: float
    volume_node_id: str
    modality: Optional[str]
    window: float
    level: float
    values: Optional[np.ndarray] = None  # (H, W) float32 scalar values before windowing, top row first, NaN outside
    volume_range: Optional[Tuple[float, float]] = None  # the volume's scalar min / max

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def _vtk_to_np(m) -> np.ndarray:
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)], dtype=float)


def _np_to_vtk(a: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(a[i, j]))
    return m


def export_geometry(
    slice_node: vtkMRMLSliceNode, export_size: Union[int, Sequence[int], None] = None
) -> Tuple[int, int, np.ndarray]:
    """(W, H, XY->RAS) of the image to capture. ``None``: the view's own pixels (identical to Slicer's XYToRAS).
    An int N: the longer side N pixels, square pixels, same field of view. (W, H): exactly that, same field of view."""
    dims = slice_node.GetDimensions()
    if export_size is None:
        return int(dims[0]), int(dims[1]), _vtk_to_np(slice_node.GetXYToRAS())
    fov = slice_node.GetFieldOfView()
    if isinstance(export_size, (int, np.integer)):
        n = int(export_size)
        if fov[0] >= fov[1]:
            w, h = n, max(1, int(round(n * fov[1] / fov[0])))
        else:
            w, h = max(1, int(round(n * fov[0] / fov[1]))), n
    else:
        w, h = int(export_size[0]), int(export_size[1])
    if w < 1 or h < 1:
        raise ValueError(f"export size must be positive, got {export_size}")
    org = slice_node.GetXYZOrigin()
    xy2slice = np.eye(4)
    xy2slice[0, 0], xy2slice[1, 1] = fov[0] / w, fov[1] / h
    xy2slice[2, 2] = fov[2] / max(1, dims[2])
    xy2slice[:3, 3] = [-fov[0] / 2 + org[0], -fov[1] / 2 + org[1], org[2]]
    return w, h, _vtk_to_np(slice_node.GetSliceToRAS()) @ xy2slice


def reslice(volume_node: vtkMRMLVolumeNode, xy_to_ras: np.ndarray, w: int, h: int, interpolate: bool) -> np.ndarray:
    """Raw scalar values of ``volume_node`` on the XY grid (VTK row order: row 0 at the bottom), float32, NaN where
    the grid lies outside the volume."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    xy_to_ijk = _vtk_to_np(ras_to_ijk) @ xy_to_ras
    transform = vtk.vtkTransform()
    transform.SetMatrix(_np_to_vtk(xy_to_ijk))
    rs = vtk.vtkImageReslice()
    rs.SetInputData(volume_node.GetImageData())
    rs.SetResliceTransform(transform)
    rs.SetOutputOrigin(0, 0, 0)
    rs.SetOutputSpacing(1, 1, 1)
    rs.SetOutputExtent(0, w - 1, 0, h - 1, 0, 0)
    rs.SetOutputScalarType(vtk.VTK_FLOAT)
    rs.SetBackgroundLevel(float("nan"))
    if interpolate:
        rs.SetInterpolationModeToLinear()
    else:
        rs.SetInterpolationModeToNearestNeighbor()
    rs.Update()
    out = rs.GetOutput()
    # vtkImageReslice sets input origin/spacing aside: the input is in IJK because the transform ends in IJK
    return vtk_to_numpy(out.GetPointData().GetScalars()).reshape(h, w)


def window_level(raw: np.ndarray, window: float, level: float) -> np.ndarray:
    """What Slicer displays: the mapping of ``vtkImageMapToWindowLevelColors``, which Slicer's scalar volume display
    node runs (grey colour table): ``(x + window / 2 - level) * 255 / window``, truncated to an integer, 0 at or
    below ``level - window / 2`` and 255 at or above ``level + window / 2``. NaN (outside the volume) is black.

    DICOM's linear VOI LUT (PS3.3 C.11.2.1.2) spreads 0..255 over ``window - 1`` instead of ``window`` (centred on
    ``level - 0.5``), so a DICOM viewer shows up to ``255 / (window - 1)`` levels more contrast than Slicer (under one
    level for windows wider than 256); the image sent is the one in the Slicer view, so VTK's mapping wins.
    Computed in double precision, as VTK does."""
    w = max(float(window), 1e-12)
    x = np.asarray(raw, dtype=np.float64)
    v = (x + (w / 2.0 - float(level))) * (255.0 / w)
    v[x >= float(level) + w / 2.0] = 255.0  # VTK's upper clamp (the product above can round to 254.99...)
    np.nan_to_num(v, copy=False, nan=0.0)
    np.clip(v, 0.0, 255.0, out=v)
    return np.floor(v).astype(np.uint8)


def capture_slice(
    slice_logic: vtkMRMLSliceLogic, export_size: Union[int, Sequence[int], None] = None, compress_level: int = 1
) -> CapturedSlice:
    """Capture the background volume of a slice view as the radiologist sees it."""
    from .scene import volume_of

    slice_node = slice_logic.GetSliceNode()
    volume = volume_of(slice_logic)
    if volume is None or volume.GetImageData() is None:
        raw_name = slice_node.GetName() if slice_node is not None else "?"
        raise ValueError(f"the {raw_name} view shows no volume: choose a background volume first")
    display = volume.GetDisplayNode()
    if display is None:
        volume.CreateDefaultDisplayNodes()
        display = volume.GetDisplayNode()
    window, level = float(display.GetWindow()), float(display.GetLevel())
    interpolate = bool(display.GetInterpolate())
    w, h, xy_to_ras = export_geometry(slice_node, export_size)
    raw = reslice(volume, xy_to_ras, w, h, interpolate)
    pixels = np.ascontiguousarray(window_level(raw, window, level)[::-1])  # PNG row order: top row first
    values = np.ascontiguousarray(raw[::-1], dtype=np.float32)
    scalar_range = volume.GetImageData().GetScalarRange()
    # PNG (u, v) -> XY (x = u - 0.5, y = H - 0.5 - v): pixel centres of both at integers / +0.5
    flip = np.array([[1.0, 0, 0, -0.5], [0, -1.0, 0, h - 0.5], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    pixel_to_ras = xy_to_ras @ flip
    normal = _vtk_to_np(slice_node.GetSliceToRAS())[:3, 2]
    thickness = float(slice_logic.GetVolumeSliceSpacing(volume)[2])
    pixel_to_ras[:3, 2] = normal / np.linalg.norm(normal) * thickness
    spacing = (float(np.linalg.norm(pixel_to_ras[:3, 1])), float(np.linalg.norm(pixel_to_ras[:3, 0])))
    return CapturedSlice(
        pixels=pixels,
        png=encode_png(pixels, compress_level),
        pixel_to_ras=pixel_to_ras,
        pixel_spacing_mm=spacing,
        slice_normal_ras=(float(normal[0]), float(normal[1]), float(normal[2])),
        slice_thickness_mm=thickness,
        view_name=slice_node.GetName(),
        orientation=slice_node.GetOrientation(),
        slice_offset_mm=float(slice_logic.GetSliceOffset()),
        volume_node_id=volume.GetID(),
        modality=volume_modality(volume),
        window=window,
        level=level,
        values=values,
        volume_range=(float(scalar_range[0]), float(scalar_range[1])),
    )


def volume_modality(volume) -> Optional[str]:
    """The volume's DICOM Modality attribute; without one (NIfTI, NRRD, arrays), "CT" when its scalar range is a
    Hounsfield range (air at -900 or below, bone at 300 or above), else None."""
    modality = volume.GetAttribute("DICOM.Modality")
    if modality:
        return modality
    image = volume.GetImageData()
    if image is not None and image.GetNumberOfScalarComponents() == 1:
        lo, hi = image.GetScalarRange()
        if lo <= -900 and hi >= 300:
            return "CT"
    return None


#: Modalities whose slice values are sent, and their unit.
VALUE_UNITS = {"CT": "HU", "MR": "raw", "MRI": "raw"}


def encode_values(
    values: np.ndarray, unit: str, volume_range: Optional[Tuple[float, float]] = None, compress_level: int = 1
) -> protocol.SliceValues:
    """Scalar values (float, NaN outside the volume) -> a lossless 16-bit PNG with ``value = slope * stored +
    intercept``. HU are integers on every CT scanner: when the finite values span at most 65535 units they are stored
    rounded to whole units (slope 1, intercept = their floor minimum); otherwise the range is scaled onto 0..65535.
    Pixels outside the volume get the minimum."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    lo = float(np.floor(finite.min())) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    if unit == "HU" and hi - lo <= 65535:
        slope = 1.0
    else:
        slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.where(np.isfinite(v), np.rint((v - lo) / slope), 0.0)
    png = encode_png(np.clip(stored, 0, 65535).astype(np.uint16), compress_level)
    vmin, vmax = volume_range if volume_range is not None else (None, None)
    return protocol.SliceValues(
        data=base64.b64encode(png).decode("ascii"),
        slope=slope,
        intercept=lo,
        unit=unit,  # type: ignore[arg-type]
        volume_min=vmin,
        volume_max=vmax,
    )


def to_request(
    captured: CapturedSlice,
    task: str,
    question: Optional[str] = None,
    region: Optional[Sequence[float]] = None,
    max_new_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    prompt: Optional[str] = None,
) -> protocol.AnalyzeRequest:
    """The request for a captured slice: pixels, spacing, modality and (CT, MR) the slice's scalar values only (no
    names, no DICOM tags)."""
    unit = VALUE_UNITS.get((captured.modality or "").upper())
    values = None
    if unit is not None and captured.values is not None:
        values = encode_values(captured.values, unit, captured.volume_range)
    return protocol.AnalyzeRequest(
        task=task,  # type: ignore[arg-type]
        image=base64.b64encode(captured.png).decode("ascii"),
        question=question,
        region=[float(v) for v in region] if region is not None else None,
        pixel_spacing_mm=[captured.pixel_spacing_mm[0], captured.pixel_spacing_mm[1]],
        modality=captured.modality,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        prompt=prompt,
        values=values,
    )


def region_from_roi(captured: CapturedSlice, roi_node: vtkMRMLMarkupsROINode) -> Tuple[float, float, float, float]:
    """The pixel box of an ROI markup (e.g. a rectangle the user drew) in the captured image, clipped to it."""
    m = _vtk_to_np(roi_node.GetObjectToWorldMatrix())
    sx, sy, sz = roi_node.GetSize()
    corners = [
        m @ np.array([a * sx / 2, b * sy / 2, c * sz / 2, 1.0]) for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)
    ]
    uv = np.array([ras_to_pixel(captured.pixel_to_ras, p[:3])[:2] for p in corners])
    x0, y0 = np.clip(uv.min(axis=0), 0, [captured.width, captured.height])
    x1, y1 = np.clip(uv.max(axis=0), 0, [captured.width, captured.height])
    if not (x1 > x0 and y1 > y0):
        raise ValueError("the region lies outside the captured view")
    return float(x0), float(y0), float(x1), float(y1)
