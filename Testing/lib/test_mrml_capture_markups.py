"""Capture, geometry and markups on Slicer's real MRML (slicer-core) with real volumes.

The pixels sent must equal the volume sampled at the recorded pixel-to-RAS positions (checked independently with the
volume's own RAS->IJK matrix), boxes must become ROIs at the RAS of their pixels, and Slicer's own render of those
ROIs must land on the same pixels."""

from __future__ import annotations

import base64
import math
import os
import shutil

import numpy as np
import pydicom
import pytest
from MiniGPTMedSlicerLib import capture as C
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib import scene as S
from MiniGPTMedSlicerLib.geometry import pixel_to_ras
from MiniGPTMedSlicerLib.png import decode_png
from vtk.util.numpy_support import vtk_to_numpy


def _dicom_series(src, folder, n=8, dz=5.0):
    os.makedirs(folder, exist_ok=True)
    ds0 = pydicom.dcmread(src)
    series = pydicom.uid.generate_uid()
    for i in range(n):
        ds = ds0.copy()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = i + 1
        pos = [float(v) for v in ds0.ImagePositionPatient]
        ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + dz * i]
        ds.save_as(os.path.join(folder, f"slice{i:03d}.dcm"))
    return folder


@pytest.fixture(scope="module")
def volumes(ctx, chest_ct_path, mni_path, anatomical_path, ct_small_path, tmp_path_factory):
    folder = _dicom_series(str(ct_small_path), str(tmp_path_factory.mktemp("dicom")))
    return {
        "chest_ct": S.load_volume(ctx, str(chest_ct_path)),
        "mni": S.load_volume(ctx, str(mni_path)),
        "anatomical": S.load_volume(ctx, str(anatomical_path)),
        "dicom_series": S.load_volume(ctx, folder),
    }


def _oblique(sl, degrees=25.0):
    sn = sl.GetSliceNode()
    m = sn.GetSliceToRAS()
    a = math.radians(degrees)
    rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    r = np.array([[m.GetElement(i, j) for j in range(3)] for i in range(3)]) @ rot
    for i in range(3):
        for j in range(3):
            m.SetElement(i, j, float(r[i, j]))
    sn.UpdateMatrices()


def _slicer_window_level(raw, window: float, level: float) -> np.ndarray:
    """Slicer's display mapping, written out here: vtkImageMapToWindowLevelColors (run by Slicer's scalar volume
    display node) computes (x + window/2 - level) * 255/window in double precision, truncates it and clamps to
    0..255, with 0 at or below level - window/2 and 255 at or above level + window/2; outside the volume (NaN here)
    the view is black."""
    x = np.asarray(raw, dtype=np.float64)
    out = np.trunc((x + (window / 2.0 - level)) * (255.0 / window))
    out = np.where(x <= level - window / 2, 0.0, np.where(x >= level + window / 2, 255.0, out))
    out = np.where(np.isnan(x), 0.0, np.clip(out, 0.0, 255.0))
    return out.astype(np.uint8)


def _dicom_voi_linear(raw, window: float, level: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear VOI LUT to 0..255 (continuous, not rounded)."""
    x = np.asarray(raw, dtype=np.float64)
    c, w = level, window
    inner = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    return np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, np.where(x > c - 0.5 + (w - 1) / 2, 255.0, inner))


def _displayed_by_slicer(ctx, raw: np.ndarray, window: float, level: float) -> np.ndarray:
    """What Slicer's own scalar volume display node (grey colour table) makes of ``raw``: its output RGBA's red."""
    import slicer
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    img = vtk.vtkImageData()
    img.SetDimensions(raw.size, 1, 1)
    img.GetPointData().SetScalars(numpy_to_vtk(raw.astype(np.float32).ravel(), deep=True, array_type=vtk.VTK_FLOAT))
    dn = slicer.vtkMRMLScalarVolumeDisplayNode()
    ctx.scene.AddNode(dn)
    try:
        dn.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        dn.AutoWindowLevelOff()
        dn.SetWindowLevel(window, level)
        source = vtk.vtkTrivialProducer()
        source.SetOutput(img)
        dn.SetInputImageDataConnection(source.GetOutputPort())
        producer = dn.GetOutputImageDataConnection().GetProducer()
        producer.Update()
        rgba = vtk_to_numpy(producer.GetOutputDataObject(0).GetPointData().GetScalars())
    finally:
        ctx.scene.RemoveNode(dn)
    return rgba.reshape((*raw.shape, 4))[..., 0]


@pytest.mark.parametrize("window,level", [(400.0, 40.0), (1500.0, -600.0), (80.0, 40.0), (2.0, 0.0), (14478.0, 7342.0)])
def test_window_level_is_what_slicer_displays(ctx, window, level):
    """The project's window/level against Slicer's own display node, VTK's formula written here, and DICOM's linear
    VOI LUT: equal to the first two; within 255/(window-1) levels (plus truncation) of DICOM's, which spreads the
    ramp over window - 1 values."""
    lo, hi = level - window, level + window
    ramp = [np.linspace(lo, hi, 20001), np.round(np.linspace(lo, hi, 2001)), [level - window / 2, level + window / 2]]
    raw = np.concatenate(ramp).astype(np.float32)  # the capture's reslice gives float32
    got = C.window_level(raw, window, level)
    assert np.array_equal(got, _displayed_by_slicer(ctx, raw, window, level))
    assert np.array_equal(got, _slicer_window_level(raw, window, level))
    assert got.min() == 0 and got.max() == 255
    assert np.abs(got - _dicom_voi_linear(raw, window, level)).max() < 1 + 255 / (window - 1)
    assert C.window_level(np.array([np.nan]), window, level)[0] == 0  # outside the volume: black


def _expected_pixels(vol, captured):
    """Independent sampling: pixel centre -> RAS (recorded matrix) -> IJK (volume) -> nearest voxel -> W/L."""
    import vtk

    arr = vtk_to_numpy(vol.GetImageData().GetPointData().GetScalars()).reshape(vol.GetImageData().GetDimensions()[::-1])
    m = vtk.vtkMatrix4x4()
    vol.GetRASToIJKMatrix(m)
    ras_to_ijk = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])
    h, w = captured.height, captured.width
    v, u = np.mgrid[0:h, 0:w].astype(float) + 0.5
    pts = np.stack([u.ravel(), v.ravel(), np.zeros(u.size), np.ones(u.size)])
    ijk = (ras_to_ijk @ captured.pixel_to_ras @ pts)[:3]
    idx = np.floor(ijk + 0.5).astype(int)
    dims = np.array(vol.GetImageData().GetDimensions())[:, None]
    inside = np.all((ijk >= -0.5) & (ijk <= dims - 0.5), axis=0)
    idx = np.clip(idx, 0, dims - 1)
    raw = arr[idx[2], idx[1], idx[0]].astype(float)
    out = _slicer_window_level(raw, captured.window, captured.level)
    out[~inside] = 0
    # sampling points exactly between two voxels: either neighbour is a correct nearest-neighbour answer
    tie = np.any(np.abs(ijk - np.floor(ijk) - 0.5) < 1e-3, axis=0)
    return out.reshape(h, w), tie.reshape(h, w)


def _mismatch(vol, captured) -> float:
    expected, tie = _expected_pixels(vol, captured)
    return float(np.mean((expected != captured.pixels) & ~tie))


@pytest.mark.parametrize("orientation", ["Axial", "Sagittal", "Coronal", "Oblique"])
@pytest.mark.parametrize("name", ["chest_ct", "mni", "anatomical", "dicom_series"])
def test_pixels_sent_equal_volume_at_recorded_positions(ctx, volumes, name, orientation):
    vol = volumes[name]
    vol.GetDisplayNode().SetInterpolate(0)
    sl = S.add_slice_view(
        ctx, vol, f"{name}{orientation}", "Axial" if orientation == "Oblique" else orientation, (240, 200)
    )
    if orientation == "Oblique":
        _oblique(sl)
    sl.SetSliceOffset(sl.GetSliceOffset() + 1.3)
    cap = C.capture_slice(sl)
    assert cap.pixels.shape == (200, 240)
    assert np.array_equal(decode_png(cap.png), cap.pixels)
    mismatch = _mismatch(vol, cap)
    assert mismatch < 0.001, f"{mismatch:.3%} of pixels differ"
    assert (cap.pixels > 0).mean() > 0.05
    # spacing and thickness recorded
    assert cap.pixel_spacing_mm[0] == pytest.approx(np.linalg.norm(cap.pixel_to_ras[:3, 1]))
    assert cap.slice_thickness_mm > 0
    # the exported image at a fixed size keeps the same field of view and geometry
    cap2 = C.capture_slice(sl, export_size=128)
    assert max(cap2.width, cap2.height) == 128
    assert _mismatch(vol, cap2) < 0.001
    # Slicer's XY grid puts pixel (0, 0) -- the bottom-left pixel centre -- on the field-of-view corner, at any size
    corner = pixel_to_ras(cap.pixel_to_ras, 0.5, cap.height - 0.5)
    assert np.allclose(corner, pixel_to_ras(cap2.pixel_to_ras, 0.5, cap2.height - 0.5), atol=1e-6)


@pytest.mark.parametrize("orientation", ["Axial", "Sagittal", "Coronal"])
@pytest.mark.parametrize("name", ["chest_ct", "mni", "anatomical"])
def test_pixels_sent_are_the_view_slicer_displays(ctx, volumes, name, orientation):
    """The captured image against the slice view's own displayed image (the slice logic's RGBA output: Slicer's
    reslice, window/level and grey colour table; transparent outside the volume, where the view is black)."""
    vol = volumes[name]
    vol.GetDisplayNode().SetInterpolate(0)
    sl = S.add_slice_view(ctx, vol, f"shown{name}{orientation}", orientation, (240, 200))
    sl.SetSliceOffset(sl.GetSliceOffset() + 1.3)
    cap = C.capture_slice(sl)
    producer = sl.GetImageDataConnection().GetProducer()
    producer.Update()
    img = producer.GetOutputDataObject(0)
    w, h, _ = img.GetDimensions()
    rgba = vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, 4)[::-1]  # PNG row order
    shown = np.where(rgba[..., 3] > 0, rgba[..., 0], 0)
    assert shown.shape == cap.pixels.shape
    differ = shown != cap.pixels
    assert differ.mean() < 0.005, f"{differ.mean():.3%} of pixels differ from the view"  # voxel-edge ties only
    assert (shown > 0).mean() > 0.05


def test_anatomical_left_handed_geometry(ctx, volumes):
    vol = volumes["anatomical"]
    import vtk

    m = vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(m)
    assert [round(m.GetElement(i, i)) for i in range(3)] == [-2, 2, -2]  # LAS with k flipped, as Slicer loads it


def test_request_carries_only_pixels_spacing_modality_and_values(ctx, volumes):
    sl = S.add_slice_view(ctx, volumes["dicom_series"], "ReqView", "Axial", (128, 96))
    cap = C.capture_slice(sl)
    req = C.to_request(cap, "detect")
    d = protocol.to_dict(req)
    assert set(d) == {"task", "image", "pixel_spacing_mm", "modality", "values"}
    assert d["modality"] == "CT"  # read from the DICOM Modality tag only
    v = d["values"]
    assert v["unit"] == "HU" and set(v) == {"data", "slope", "intercept", "unit", "volume_min", "volume_max"}
    stored = decode_png(base64.b64decode(v["data"]))
    assert stored.dtype == np.uint16 and stored.shape == cap.pixels.shape == (96, 128)
    hu = stored * v["slope"] + v["intercept"]
    # the same reslice as the image, before windowing: the window applied to the HU gives the image's pixels
    assert np.array_equal(_slicer_window_level(hu, cap.window, cap.level), cap.pixels)
    # and they are the volume's voxel values: nearest voxel of the independently read series
    finite = np.isfinite(cap.values)
    assert np.allclose(hu[finite], np.rint(cap.values[finite]), atol=0.5)


def _response(boxes, labels=None):
    labels = labels or [f"lesion {i}" for i in range(len(boxes))]
    return protocol.AnalyzeResponse(
        task="detect",
        engine="test",
        model="m",
        text="Two findings.",
        findings=[
            protocol.Finding(lab, list(b), 0.5 + 0.1 * i) for i, (lab, b) in enumerate(zip(labels, boxes, strict=True))
        ],
        raw_output="<raw>",
    )


def test_box_becomes_roi_at_ras_of_its_pixels(ctx, volumes):
    sl = S.add_slice_view(ctx, volumes["mni"], "RoiView", "Coronal", (256, 256))
    _oblique(sl, 15)
    cap = C.capture_slice(sl)
    box = [60.0, 80.0, 120.0, 110.0]
    nodes = M.add_analysis_results(ctx.scene, cap, _response([box]))
    roi = nodes.rois[0]
    expected_center = pixel_to_ras(cap.pixel_to_ras, 90.0, 95.0)
    assert np.allclose(M.roi_center(roi), expected_center, atol=1e-4)
    sx, sy, sz = roi.GetSize()
    assert sx == pytest.approx(60 * cap.pixel_spacing_mm[1]) and sy == pytest.approx(30 * cap.pixel_spacing_mm[0])
    assert sz == pytest.approx(cap.slice_thickness_mm)
    # ROI axes follow the (oblique) slice axes
    m = roi.GetObjectToWorldMatrix()
    x_axis = np.array([m.GetElement(i, 0) for i in range(3)])
    assert np.allclose(x_axis, cap.pixel_to_ras[:3, 0] / np.linalg.norm(cap.pixel_to_ras[:3, 0]), atol=1e-6)
    assert roi.GetLocked() and roi.GetName() == "lesion 0"
    assert roi.GetAttribute("MiniGPTMed.box_px") == "60.00 80.00 120.00 110.00"
    # region_from_roi projects it back to the same pixels
    assert np.allclose(C.region_from_roi(cap, roi), box, atol=1e-3)
    M.remove_analysis(ctx.scene, nodes.folder_item)


def test_render_round_trip_within_2px(ctx, volumes, tmp_path):
    from PIL import Image

    from headless.render import render_slice_view

    sl = S.add_slice_view(ctx, volumes["chest_ct"], "RenderView", "Axial", (320, 320))
    sl.SetSliceOffset(-157.5)
    cap = C.capture_slice(sl)
    box = [100.0, 120.0, 190.0, 170.0]
    nodes = M.add_analysis_results(ctx.scene, cap, _response([box], ["hyperdense region"]))
    nodes.rois[0].GetDisplayNode().SetPropertiesLabelVisibility(False)  # outline only, for measuring
    nodes.rois[0].GetDisplayNode().SetFillOpacity(0.0)
    png = render_slice_view(ctx.app_logic, sl, str(tmp_path / "v.png"), (cap.width, cap.height))
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    r, g, b = (np.array(M.label_color("hyperdense region")) * 255).astype(int)
    mask = (np.abs(img[..., 0] - r) < 40) & (np.abs(img[..., 1] - g) < 40) & (np.abs(img[..., 2] - b) < 40)
    ys, xs = np.nonzero(mask)
    assert len(xs) > 100
    found = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert np.allclose(found, box, atol=2.0), (found, box)
    M.remove_analysis(ctx.scene, nodes.folder_item)


def test_failure_midway_leaves_scene_unchanged(ctx, volumes, monkeypatch):
    sl = S.add_slice_view(ctx, volumes["mni"], "AtomicView", "Axial", (128, 128))
    cap = C.capture_slice(sl)
    before = ctx.scene.GetNumberOfNodes()
    items_before = len(M.list_results(ctx.scene))
    real_add_roi = M.add_roi
    calls = {"n": 0}

    def failing_add_roi(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_add_roi(*a, **kw)

    monkeypatch.setattr(M, "add_roi", failing_add_roi)
    with pytest.raises(RuntimeError, match="injected"):
        M.add_analysis_results(ctx.scene, cap, _response([[1, 1, 5, 5], [10, 10, 20, 20], [30, 30, 40, 40]]))
    assert ctx.scene.GetNumberOfNodes() == before
    assert len(M.list_results(ctx.scene)) == items_before


def test_sweep_failure_midway_keeps_scene_and_earlier_results(ctx, volumes, monkeypatch):
    from MiniGPTMedSlicerLib.merge3d import Finding3D

    sl = S.add_slice_view(ctx, volumes["mni"], "AtomicSweepView", "Axial", (128, 128))
    M.clear_results(ctx.scene)
    earlier = M.add_analysis_results(ctx.scene, C.capture_slice(sl), _response([[1, 1, 5, 5]]))
    before = ctx.scene.GetNumberOfNodes()
    findings = [
        Finding3D(
            "mass", [0, 1], [(1, 1, 5, 5)] * 2, [0.5, 0.5], (10.0 * i, 0.0, 0.0), (5.0, 5.0, 2.0), np.eye(3).tolist()
        )
        for i in range(3)
    ]
    sweep = dict(task="detect", engine="builtin", model="m", view_name="AtomicSweepView", summary="s")
    real_add_roi = M.add_roi
    calls = {"n": 0}

    def failing_add_roi(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_add_roi(*a, **kw)

    monkeypatch.setattr(M, "add_roi", failing_add_roi)
    with pytest.raises(RuntimeError, match="injected"):
        M.add_sweep_results(ctx.scene, findings, offsets_mm=[0.0, 1.0], replace_previous=True, **sweep)
    assert ctx.scene.GetNumberOfNodes() == before
    assert M.list_results(ctx.scene) == [earlier.folder_item]  # the earlier analysis is not replaced by a failure
    monkeypatch.setattr(M, "add_roi", real_add_roi)
    done = M.add_sweep_results(ctx.scene, findings, offsets_mm=[0.0, 1.0], replace_previous=True, **sweep)
    assert M.list_results(ctx.scene) == [done.folder_item] and len(M.finding_rows(ctx.scene)) == 3
    M.remove_analysis(ctx.scene, done.folder_item)


def test_replace_clear_rows_and_jump(ctx, volumes):
    sl = S.add_slice_view(ctx, volumes["mni"], "RowsView", "Axial", (200, 200))
    cap = C.capture_slice(sl)
    M.clear_results(ctx.scene)
    M.add_analysis_results(ctx.scene, cap, _response([[10, 10, 30, 40]]))
    M.add_analysis_results(ctx.scene, cap, _response([[50, 50, 70, 70], [80, 80, 90, 95]]))
    assert len(M.list_results(ctx.scene)) == 2 and len(M.finding_rows(ctx.scene)) == 3
    third = M.add_analysis_results(ctx.scene, cap, _response([[5, 5, 9, 9]]), replace_previous=True)
    rows = M.finding_rows(ctx.scene)
    assert len(M.list_results(ctx.scene)) == 1 and len(rows) == 1 and rows[0].view == "RowsView"
    sag = S.add_slice_view(ctx, volumes["mni"], "JumpSag", "Sagittal", (200, 200))
    c = M.jump_to_finding([sl.GetSliceNode(), sag.GetSliceNode()], third.rois[0])
    assert sag.GetSliceOffset() == pytest.approx(
        -c[0] if sag.GetSliceNode().GetSliceToRAS().GetElement(0, 2) < 0 else c[0], abs=1e-3
    )
    assert third.rois[0].GetSelected()
    assert M.clear_results(ctx.scene) == 1 and M.finding_rows(ctx.scene) == []


def test_mrb_reloads_rois_labels_text_and_attributes(ctx, volumes, tmp_path):
    sl = S.add_slice_view(ctx, volumes["anatomical"], "MrbView", "Sagittal", (160, 160))
    cap = C.capture_slice(sl)
    M.clear_results(ctx.scene)
    M.add_analysis_results(ctx.scene, cap, _response([[20, 30, 60, 70], [70, 70, 90, 100]], ["nodule", "cyst"]))
    path = S.save_mrb(ctx, str(tmp_path / "scene.mrb"))
    ctx2 = S.open_mrb(path, str(tmp_path / "unpacked"))
    try:
        rois = M._all_rois(ctx2.scene)
        assert sorted(r.GetName() for r in rois) == ["cyst", "nodule"]
        nodule = next(r for r in rois if r.GetName() == "nodule")
        assert nodule.GetAttribute("MiniGPTMed.engine") == "test" and nodule.GetAttribute("MiniGPTMed.score") == "0.5"
        assert nodule.GetLocked()
        texts = ctx2.scene.GetNodesByClass("vtkMRMLTextNode")
        text = texts.GetItemAsObject(0)
        assert text.GetText() == "Two findings." and text.GetAttribute("MiniGPTMed.raw_output") == "<raw>"
        assert len(M.list_results(ctx2.scene)) == 1 and len(M.finding_rows(ctx2.scene)) == 2
        vols = ctx2.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        assert vols.GetNumberOfItems() >= 1
    finally:
        S.close(ctx2)
        shutil.rmtree(tmp_path / "unpacked", ignore_errors=True)


def test_load_errors(ctx, tmp_path):
    n0 = ctx.scene.GetNumberOfNodes()
    with pytest.raises(S.VolumeLoadError, match="no such file"):
        S.load_volume(ctx, str(tmp_path / "missing.nii.gz"))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a volume at all")
    with pytest.raises(S.VolumeLoadError, match="cannot read"):
        S.load_volume(ctx, str(bad))
    import SimpleITK as sitk

    rgb = sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(S.VolumeLoadError, match=r"components|scalar"):
        S.load_volume(ctx, str(tmp_path / "rgb.nrrd"))
    assert ctx.scene.GetNumberOfNodes() == n0
