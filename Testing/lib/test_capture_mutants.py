"""capture.py, sharp enough for mutation testing (``make mutation``): window/level, the values' 16-bit PNG, the
request, and a capture of a tiny real MRML volume (slicer-core) in a 7 x 5 view with 3 x 4 mm pixels, every expected
pixel, value and matrix entry worked out by hand here (the arithmetic in the comments).

The volume: 6 x 5 x 4 voxels (i, j, k), spacing 2, 3, 4 mm, origin (10, 20, 30), identity directions, so voxel
(i, j, k) is at RAS (10 + 2i, 20 + 3j, 30 + 4k) and holds 10 * (30k + 6j + i) - 500 (-500 .. 690)."""

from __future__ import annotations

import base64
import warnings

import numpy as np
import pytest
from MiniGPTMedSlicerLib import capture as C
from MiniGPTMedSlicerLib import scene as S
from MiniGPTMedSlicerLib.png import decode_png, encode_png

NAN = float("nan")


def _volume(ctx, data: np.ndarray, display: bool = True, components: int = 1):
    import slicer
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    img = vtk.vtkImageData()
    img.SetDimensions(data.shape[2], data.shape[1], data.shape[0])
    img.GetPointData().SetScalars(
        numpy_to_vtk(np.repeat(data.ravel(), components).reshape(-1, components), deep=True, array_type=vtk.VTK_SHORT)
    )
    v = slicer.vtkMRMLScalarVolumeNode()
    v.SetAndObserveImageData(img)
    v.SetSpacing(2, 3, 4)
    v.SetOrigin(10, 20, 30)
    ctx.scene.AddNode(v)
    if display:
        v.CreateDefaultDisplayNodes()
    return v


AXIAL = [[-1, 0, 0], [0, 1, 0], [0, 0, 1]]
CORONAL = [[-1, 0, 0], [0, 0, 1], [0, 1, 0]]  # x to the patient's left, y up (S), the normal anterior


def _set_axial_view(sl, fov=(21.0, 20.0, 4.0), dims=(7, 5), origin=(0.0, 0.0, 0.0), rot=AXIAL, nz=1):
    """Axial view (x to the patient's left: SliceToRAS diag(-1, 1, 1)) centred on RAS (15, 26, 38), the plane k = 2."""
    sn = sl.GetSliceNode()
    m = sn.GetSliceToRAS()
    for i, row in enumerate([[*rot[0], 15], [*rot[1], 26], [*rot[2], 38], [0, 0, 0, 1]]):
        for j, x in enumerate(row):
            m.SetElement(i, j, float(x))
    sn.SetDimensions(dims[0], dims[1], nz)
    sn.SetFieldOfView(*fov)
    sn.SetXYZOrigin(*origin)
    sn.UpdateMatrices()
    return sn


@pytest.fixture(scope="module")
def tiny(ctx):
    k, j, i = np.meshgrid(np.arange(4), np.arange(5), np.arange(6), indexing="ij")
    vol = _volume(ctx, (10 * (30 * k + 6 * j + i) - 500).astype(np.int16))
    sl = S.add_slice_view(ctx, vol, name="Red", size=(7, 5))
    return vol, sl


# -- window / level --------------------------------------------------------------------------------------------


def test_window_level_by_hand():
    # window 1020, level 0: (x + 510) * 0.25, truncated, 0 at or below -510 and 255 at or above 510
    raw = np.array([-1000, -510, -509, 0, 1, 2, 509, 510, 1000, NAN])
    assert C.window_level(raw, 1020, 0).tolist() == [0, 0, 0, 127, 127, 128, 254, 255, 255, 0]
    # window 2, level 0.5: (x + 0.5) * 127.5
    assert C.window_level(np.array([-0.5, 0.0, 1.0, 1.49, 1.5]), 2.0, 0.5).tolist() == [0, 63, 191, 253, 255]
    # exactly at level + window / 2 the product rounds to 254.99999999999997: VTK's clamp makes it 255
    assert C.window_level(np.array([-37.5, -37.6]), 25.0, -50.0).tolist() == [255, 253]
    # window 0: a step at the level (the window taken as 1e-12)
    assert C.window_level(np.array([41.0, 40.4, 39.0]), 0.0, 40.0).tolist() == [255, 255, 0]
    assert C.window_level(np.array([0.125]), 0.5, 0.25).tolist() == [63]  # a window under 1: (0.125 + 0) * 510
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN becomes 0 before the cast (casting NaN warns and is undefined)
        assert C.window_level(np.array([NAN, 1.0]), 1020, 0).tolist() == [0, 127]
    assert C.window_level(np.array([[3, 4]], dtype=np.int16), 10.0, 0.0).dtype == np.uint8


# -- the values' PNG and the request -------------------------------------------------------------------------------


def _stored(sv) -> list:
    return decode_png(base64.b64decode(sv.data)).tolist()


def test_encode_values_hu_whole_units():
    sv = C.encode_values(np.array([[-1000.4, 0.0], [NAN, 2000.6]]), "HU")
    # intercept: the floor of the minimum (-1001); stored = rint(v + 1001), NaN as the minimum
    assert (sv.slope, sv.intercept, sv.unit, sv.volume_min, sv.volume_max) == (1.0, -1001.0, "HU", None, None)
    assert _stored(sv) == [[1, 1001], [0, 3002]]
    wide = C.encode_values(np.array([[0.0, 70000.0, 35000.0]]), "HU", (-3.0, 4.0))
    assert wide.slope == 70000 / 65535 and wide.intercept == 0.0 and (wide.volume_min, wide.volume_max) == (-3.0, 4.0)
    assert _stored(wide) == [[0, 65535, 32768]]  # 35000 / (70000 / 65535) = 32767.5 -> rint 32768
    high = C.encode_values(np.array([[40000.0, 50000.0]]), "HU")  # the span counts, not the values
    assert (high.slope, high.intercept, _stored(high)) == (1.0, 40000.0, [[0, 10000]])
    low = C.encode_values(np.array([[-70000.0, 0.0]]), "HU")
    assert (low.slope, low.intercept, _stored(low)) == (70000 / 65535, -70000.0, [[0, 65535]])
    assert C.encode_values(np.array([[0.0, 65535.0]]), "HU").slope == 1.0  # 65535 units fit
    assert C.encode_values(np.array([[0.0, 65536.0]]), "HU").slope == 65536 / 65535


def test_encode_values_raw_scaled_onto_16_bits():
    sv = C.encode_values(np.array([[10.5, 20.25], [30.0, NAN]]), "raw", (0.0, 100.0))
    # lo = floor(10.5) = 10, hi = 30: slope 20 / 65535; 0.5 / slope = 1638.4, 10.25 / slope = 33586.7
    assert sv.slope == 20 / 65535 and sv.intercept == 10.0 and (sv.volume_min, sv.volume_max) == (0.0, 100.0)
    assert _stored(sv) == [[1638, 33587], [65535, 0]]
    flat = C.encode_values(np.array([[5.0, 5.0]]), "raw")
    assert (flat.slope, flat.intercept, _stored(flat)) == (1.0, 5.0, [[0, 0]])
    # in double precision: float32 670.0618 is 670.06183; * 65535 / 1000 = 43912.502 -> 43913 (float32: 43912)
    f32 = C.encode_values(np.array([[0.0, 670.0618, 1000.0]], dtype=np.float32), "raw")
    assert _stored(f32) == [[0, 43913, 65535]]
    for unit in ("HU", "raw"):  # nothing inside the volume: slope 1, intercept 0
        empty = C.encode_values(np.array([[NAN, NAN]]), unit)
        assert (empty.slope, empty.intercept, _stored(empty)) == (1.0, 0.0, [[0, 0]])


def _captured(modality, values=True):
    pixels = np.array([[0, 10, 20], [30, 40, 50]], dtype=np.uint8)
    return C.CapturedSlice(
        pixels=pixels,
        png=encode_png(pixels),
        pixel_to_ras=np.eye(4),
        pixel_spacing_mm=(0.75, 0.5),
        slice_normal_ras=(0.0, 0.0, 1.0),
        slice_thickness_mm=2.0,
        view_name="Red",
        orientation="Axial",
        slice_offset_mm=0.0,
        volume_node_id="vtkMRMLScalarVolumeNode1",
        modality=modality,
        window=400.0,
        level=40.0,
        values=np.array([[-100.0, 0.0, 7.0], [1.0, 2.0, 3.0]], dtype=np.float32) if values else None,
        volume_range=(-1024.0, 3071.0),
    )


def test_to_request_carries_pixels_spacing_and_values_only():
    cap = _captured("ct")
    assert (cap.width, cap.height) == (3, 2)
    req = C.to_request(cap, "identify", "what?", (1, 0, 3, 2), max_new_tokens=7, temperature=0.5, prompt="p")
    assert decode_png(base64.b64decode(req.image)).tolist() == [[0, 10, 20], [30, 40, 50]]
    assert (req.task, req.question, req.region, req.max_new_tokens, req.temperature, req.prompt) == (
        "identify",
        "what?",
        [1.0, 0.0, 3.0, 2.0],
        7,
        0.5,
        "p",
    )
    assert req.pixel_spacing_mm == [0.75, 0.5] and req.modality == "ct"
    v = req.values
    assert v is not None and (v.unit, v.slope, v.intercept, v.volume_min, v.volume_max) == (
        "HU",
        1.0,
        -100.0,
        -1024.0,
        3071.0,
    )
    assert _stored(v) == [[0, 100, 107], [101, 102, 103]]
    assert all(isinstance(x, float) for x in req.region)
    bare = C.to_request(cap, "report")
    assert (bare.question, bare.region, bare.max_new_tokens, bare.temperature, bare.prompt) == (None,) * 5
    for modality, unit in (("MR", "raw"), ("mri", "raw")):
        rv = C.to_request(_captured(modality), "report").values
        assert rv is not None and rv.unit == unit and rv.slope == 107 / 65535
    assert C.to_request(_captured("US"), "report").values is None
    assert C.to_request(_captured(None), "report").values is None
    assert C.to_request(_captured("CT", values=False), "report").values is None


# -- the capture of a real MRML view --------------------------------------------------------------------------------


def test_export_geometry_by_hand(tiny):
    _, sl = tiny
    sn = _set_axial_view(sl, origin=(1.0, 2.0, 0.0))
    w, h, m = C.export_geometry(sn)  # the view's own pixels: Slicer's XYToRAS
    assert (w, h) == (7, 5) and np.array_equal(m, C._vtk_to_np(sn.GetXYToRAS()))
    # (14, 10) over the 21 x 20 mm field: 1.5 x 2 mm; x = -1 * (1.5 X - 10.5 + 1) + 15, y = 2 Y - 10 + 2 + 26
    w, h, m = C.export_geometry(sn, (14, 10))
    assert (w, h) == (14, 10)
    assert np.allclose(m, [[-1.5, 0, 0, 24.5], [0, 2, 0, 18], [0, 0, 4, 38], [0, 0, 0, 1]])
    sn = _set_axial_view(sl, nz=2)  # two slices deep: the z step is half the field's depth, as Slicer's own
    assert sn.GetXYToRAS().GetElement(2, 2) == 2.0 and C.export_geometry(sn, (14, 10))[2][2, 2] == 2.0
    sn = _set_axial_view(sl, origin=(1.0, 2.0, 0.0))
    w, h, m = C.export_geometry(sn, 14)  # the longer side 14: 20 / 21 * 14 = 13.3 -> 13 rows
    assert (w, h) == (14, 13) and np.allclose(m[:2, :2], [[-1.5, 0], [0, 20 / 13]])
    sn = _set_axial_view(sl, fov=(20.0, 21.0, 4.0))  # portrait field: 13 columns
    w, h, m = C.export_geometry(sn, np.int64(14))
    assert (w, h) == (13, 14) and np.allclose(m[:2, :2], [[-20 / 13, 0], [0, 1.5]])
    sn = _set_axial_view(sl, fov=(21.0, 1.0, 4.0))
    assert C.export_geometry(sn, 10)[:2] == (10, 1)  # 10 / 21 rounds to 0: one row
    sn = _set_axial_view(sl, fov=(1.0, 21.0, 4.0))
    assert C.export_geometry(sn, 10)[:2] == (1, 10)
    with pytest.raises(ValueError, match="export size must be positive, got"):
        C.export_geometry(sn, (0, 5))
    with pytest.raises(ValueError):
        C.export_geometry(sn, (5, 0))


# pixel (row r, column c) of the 7 x 5 view: RAS (25.5 - 3c, 32 - 4r, 38), voxel i = (15.5 - 3c) / 2,
# j = (12 - 4r) / 3, k = 2: columns 2..5 have i = 4.75, 3.25, 1.75, 0.25 (nearest 5, 3, 2, 0), rows 0..3 have
# j = 4, 2.67, 1.33, 0 (nearest 4, 3, 1, 0); the rest lies outside the volume. Value = 100 + 60 j + 10 i.
EXPECTED_VALUES = [
    [NAN, NAN, 390, 370, 360, 340, NAN],
    [NAN, NAN, 330, 310, 300, 280, NAN],
    [NAN, NAN, 210, 190, 180, 160, NAN],
    [NAN, NAN, 150, 130, 120, 100, NAN],
    [NAN] * 7,
]
# window 510, level 300: (x - 45) / 2 truncated, black outside
EXPECTED_PIXELS = [
    [0, 0, 172, 162, 157, 147, 0],
    [0, 0, 142, 132, 127, 117, 0],
    [0, 0, 82, 72, 67, 57, 0],
    [0, 0, 52, 42, 37, 27, 0],
    [0] * 7,
]


def test_capture_of_the_tiny_volume_by_hand(tiny):
    vol, sl = tiny
    _set_axial_view(sl)
    d = vol.GetDisplayNode()
    d.AutoWindowLevelOff()
    d.SetWindowLevel(510.0, 300.0)
    d.SetInterpolate(0)
    cap = C.capture_slice(sl)
    assert cap.pixels.dtype == np.uint8 and cap.pixels.tolist() == EXPECTED_PIXELS
    assert decode_png(cap.png).tolist() == EXPECTED_PIXELS
    assert cap.values is not None and cap.values.dtype == np.float32
    assert np.array_equal(cap.values, np.array(EXPECTED_VALUES), equal_nan=True)
    # PNG (u, v) -> XY (u - 0.5, 4.5 - v) -> RAS: R = 25.5 - 3 (u - 0.5), A = 16 + 4 (4.5 - v); the third column is
    # the normal times the slice spacing (4 mm)
    assert np.allclose(cap.pixel_to_ras, [[-3, 0, 0, 27], [0, -4, 0, 34], [0, 0, 4, 38], [0, 0, 0, 1]])
    assert cap.pixel_spacing_mm == (4.0, 3.0) and cap.slice_thickness_mm == 4.0
    assert cap.slice_normal_ras == (0.0, 0.0, 1.0) and cap.slice_offset_mm == 38.0
    assert (cap.view_name, cap.orientation, cap.volume_node_id) == ("Red", "Axial", vol.GetID())
    assert (cap.window, cap.level, cap.modality, cap.volume_range) == (510.0, 300.0, None, (-500.0, 690.0))
    assert (cap.width, cap.height) == (7, 5)
    vol.SetAttribute("DICOM.Modality", "MR")
    assert C.capture_slice(sl).modality == "MR"
    vol.RemoveAttribute("DICOM.Modality")
    # linear interpolation when the display interpolates: column 3 (i = 3.25) of row 0 is 370 + 2.5
    d.SetInterpolate(1)
    lin = C.capture_slice(sl)
    assert lin.values is not None and lin.values[0, 3] == pytest.approx(372.5)
    d.SetInterpolate(0)
    big = C.capture_slice(sl, export_size=(14, 10))  # 1.5 x 2 mm pixels over the same field
    assert big.pixels.shape == (10, 14) and big.pixel_spacing_mm == (2.0, 1.5)
    # PNG row r, column c -> XY (c, 9 - r) -> RAS (25.5 - 1.5 c, 34 - 2 r, 38): row 1, column 4 is voxel
    # (4.75 -> 5, 4, 2) = 390; row 0 (j = 4.67) and the bottom right corner (i = -2) lie outside
    assert big.values is not None and big.values[1, 4] == 390.0
    assert np.isnan(big.values[0, 4]) and np.isnan(big.values[9, 13])


def test_capture_refuses_an_empty_view(ctx):
    import slicer

    empty = slicer.vtkMRMLSliceLogic()
    empty.SetMRMLApplicationLogic(ctx.app_logic)
    empty.SetMRMLScene(ctx.scene)
    empty.AddSliceNode("Green")
    with pytest.raises(ValueError) as e:
        C.capture_slice(empty)
    assert str(e.value) == "the Green view shows no volume: choose a background volume first"
    no_data = slicer.vtkMRMLScalarVolumeNode()
    ctx.scene.AddNode(no_data)
    empty.GetSliceCompositeNode().SetBackgroundVolumeID(no_data.GetID())
    with pytest.raises(ValueError, match="the Green view shows no volume"):
        C.capture_slice(empty)


def test_capture_of_a_coronal_view_records_its_normal(tiny):
    vol, sl = tiny
    _set_axial_view(sl, rot=CORONAL)
    cap = C.capture_slice(sl)
    assert cap.slice_normal_ras == (0.0, 1.0, 0.0) and cap.orientation == "Coronal"
    # the third column: the unit normal times the slice spacing Slicer reports for this volume in this view
    assert np.allclose(cap.pixel_to_ras[:3, 2], [0, sl.GetVolumeSliceSpacing(vol)[2], 0])
    # R = 25.5 - 3 (u - 0.5), S = 38 - 10 + 4 (4.5 - v)
    assert np.allclose(cap.pixel_to_ras[[0, 2]][:, [0, 1, 3]], [[-3, 0, 27], [0, -4, 46]])
    _set_axial_view(sl)


def test_capture_refuses_a_logic_without_a_view(ctx):
    import slicer

    bare = slicer.vtkMRMLSliceLogic()
    bare.SetMRMLScene(ctx.scene)
    with pytest.raises(ValueError) as e:
        C.capture_slice(bare)
    assert str(e.value) == "the ? view shows no volume: choose a background volume first"


def test_volume_modality(ctx):
    def vol(lo, hi, components=1, attr=None):
        v = _volume(ctx, np.array([[[lo, hi]]], dtype=np.int16), display=False, components=components)
        if attr:
            v.SetAttribute("DICOM.Modality", attr)
        return v

    assert C.volume_modality(vol(-900, 300)) == "CT"  # a Hounsfield range, exactly at both limits
    assert C.volume_modality(vol(-899, 3000)) is None
    assert C.volume_modality(vol(-1000, 299)) is None
    assert C.volume_modality(vol(-1000, 300, components=2)) is None  # colour or vector: never CT
    assert C.volume_modality(vol(0, 10, attr="MR")) == "MR"
    assert C.volume_modality(vol(-1000, 1000, attr="PT")) == "PT"


def test_region_from_roi_by_hand(ctx, tiny):
    import slicer

    vol, sl = tiny
    _set_axial_view(sl)
    vol.GetDisplayNode().SetInterpolate(0)
    cap = C.capture_slice(sl)  # pixel_to_ras: R = 27 - 3u, A = 34 - 4v

    def roi(center, size):
        r = slicer.vtkMRMLMarkupsROINode()
        ctx.scene.AddNode(r)
        r.SetCenter(*center)
        r.SetSize(*size)
        return r

    # R 16.5 .. 22.5 -> u 1.5 .. 3.5; A 22 .. 26 -> v 2 .. 3 (the S extent does not matter)
    assert C.region_from_roi(cap, roi((19.5, 24, 38), (6, 4, 2))) == pytest.approx((1.5, 2.0, 3.5, 3.0))
    # partly outside: R 4.5 .. 10.5 -> u 5.5 .. 7.5 clipped to 7; A 30 .. 38 -> v -1 .. 1 clipped to 0
    assert C.region_from_roi(cap, roi((7.5, 34, 38), (6, 8, 2))) == pytest.approx((5.5, 0.0, 7.0, 1.0))
    # bottom right partly outside: R 0 .. 6 -> u 7 .. 9 -> nothing left
    with pytest.raises(ValueError, match=r"^the region lies outside the captured view$"):
        C.region_from_roi(cap, roi((3, 24, 38), (6, 4, 2)))
    with pytest.raises(ValueError):  # above the view: v -3 .. -1
        C.region_from_roi(cap, roi((19.5, 42, 38), (6, 8, 2)))
    with pytest.raises(ValueError):  # below the view: v 5.5 .. 7.5, clipped to 5 .. 5
        C.region_from_roi(cap, roi((19.5, 8, 38), (6, 8, 2)))
    # just inside the bottom edge: v 4.5 .. 6.5 clipped to 4.5 .. 5
    assert C.region_from_roi(cap, roi((19.5, 12, 38), (6, 8, 2))) == pytest.approx((1.5, 4.5, 3.5, 5.0))
    # a coronal view: the ROI's S extent is the v range: R = 27 - 3u, S = 46 - 4v; S 36 .. 44 -> v 0.5 .. 2.5
    _set_axial_view(sl, rot=CORONAL)
    cor = C.capture_slice(sl)
    assert C.region_from_roi(cor, roi((19.5, 26, 40), (6, 2, 8))) == pytest.approx((1.5, 0.5, 3.5, 2.5))
    _set_axial_view(sl)
