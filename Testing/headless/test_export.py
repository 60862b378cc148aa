"""Review and export through the runner (in-process, real backend): DICOM SR checked by dciodvfy, read back by
highdicom and mapped back through each referenced instance's IPP/IOP/PixelSpacing (pydicom, in this test) onto the
finding's box; Slicer markups; the table; a non-DICOM source; a review file; the same exports from a sweep (SCOORD on
the best slice's instance for an axial sweep, SCOORD3D for a sagittal one)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import run_runner
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib import review as R
from MiniGPTMedSlicerLib import scene as S

_runner = run_runner


def _corners(m, box):
    """The box corners in RAS from the sent image's pixel_to_ras (findings.json), computed here."""
    m = np.asarray(m, float)
    x0, y0, x1, y1 = box
    return np.array([(m @ [u, v, 0, 1])[:3] for u, v in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))])


def _scoord_to_ras(ds, col, row):
    """DICOM pixel (column, row), (0, 0) = top-left corner of the top-left pixel -> RAS, with pydicom's tags only."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = ipp + iop[:3] * dc * (col - 0.5) + iop[3:] * dr * (row - 0.5)
    return np.array([-lps[0], -lps[1], lps[2]])


def _dciodvfy(path):
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy missing: make test installs dicom3tools (apt-get install dicom3tools)"
    r = subprocess.run([exe, str(path)], capture_output=True, timeout=60)
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    lines = out.splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


@pytest.fixture(scope="module")
def axial_export(dicom_folder, builtin_server, tmp_path_factory):
    root, uids = dicom_folder
    out = tmp_path_factory.mktemp("export")
    r = _runner(
        "analyze", str(root), "--view", "axial", "--slice", "8", "--task", "ground", "--question", "bone", "--backend", builtin_server,
        "--out", str(out / "run"), "--export-sr", str(out / "sr.dcm"), "--export-table", str(out / "t.csv"),
        "--export-markups", str(out / "mk"), "--scene", "none",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out, uids, r


def test_sr_is_valid_and_maps_back_within_half_a_pixel(axial_export, dicom_folder):
    out, uids, r = axial_export
    assert "series 1 of 2" in r.stderr
    errors, warnings = _dciodvfy(out / "sr.dcm")
    print("dciodvfy warnings:", *warnings, sep="\n  ")
    assert errors == []
    data = json.loads((out / "run" / "findings.json").read_text())
    assert data["findings"], "the built-in engine found nothing on this slice"
    sr = hd.sr.srread(str(out / "sr.dcm"))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" and sr.StudyInstanceUID == uids["study"]
    assert sr.PatientID == "CHEST-1"
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert ev.StudyInstanceUID == uids["study"] and ev.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["series"]
    files = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
        for p in (dicom_folder[0] / "sub" / "ct").iterdir()
    }
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(data["findings"])
    worst = 0.0
    for g, f in zip(groups, data["findings"], strict=True):
        region = g.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        pts = region.value
        assert pts.shape == (5, 2) and np.array_equal(pts[0], pts[-1])
        ref = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        ds = pydicom.dcmread(files[ref], stop_before_pixels=True)
        back = np.array([_scoord_to_ras(ds, c, rr) for c, rr in pts[:4]])
        want = _corners(data["pixel_to_ras"], f["box_px"])
        # the slice plane of the referenced instance is the analysed one
        assert abs(float(ds.ImagePositionPatient[2]) - data["slice_offset_mm"]) < 1e-3
        err_px = np.abs(back - want).max() / min(float(v) for v in ds.PixelSpacing)
        worst = max(worst, err_px)
        assert err_px <= 0.5
        assert g.tracking_uid and str(g.tracking_identifier).startswith("F")
        assert g.finding_type.meaning in ("Clinical finding",) or g.finding_type.scheme_designator == "SCT"
    print(f"SCOORD -> RAS: worst corner error {worst:.4f} px over {len(groups)} finding(s)")


def test_table_and_markups(axial_export):
    out, _, _ = axial_export
    data = json.loads((out / "run" / "findings.json").read_text())
    rows = list(csv.DictReader((out / "t.csv").open()))
    assert [r["id"] for r in rows] == [f"F{i}" for i in range(1, len(data["findings"]) + 1)]
    for row, f in zip(rows, data["findings"], strict=True):
        assert row["status"] == "accepted" and row["label"] == f["label"] and row["engine"] == "builtin"
        assert np.allclose(
            [float(row[k]) for k in ("center_r", "center_a", "center_s")], f["roi_center_ras"], atol=1e-3
        )
        assert float(row["size_x_mm"]) == pytest.approx(f["roi_size_mm"][0], rel=1e-4)
    js = json.loads((out / "t.json").read_text())["findings"]
    assert [x["id"] for x in js] == [r["id"] for r in rows]
    ctx = S.create_scene()
    try:
        for row, f in zip(rows, data["findings"], strict=True):
            node = ctx.markups_logic.AddNewDisplayNodeForMarkupsNode
            nid = ctx.markups_logic.LoadMarkups(str(out / "mk" / f"{row['id']}.mrk.json"))
            roi = ctx.scene.GetNodeByID(nid)
            assert roi is not None and roi.IsA("vtkMRMLMarkupsROINode")
            assert np.allclose(M.roi_center(roi), f["roi_center_ras"], atol=1e-3)
            assert np.allclose(roi.GetSize(), f["roi_size_mm"], atol=1e-3)
            del node
    finally:
        S.close(ctx)
    assert not list(out.glob(".*")) and not list((out / "mk").glob(".*"))  # no temporary files left


def test_sagittal_view_gives_scoord3d_and_review_file(dicom_folder, builtin_server, tmp_path):
    root, uids = dicom_folder
    review = tmp_path / "review.json"
    review.write_text(json.dumps({"findings": [{"id": "F1", "status": "edited", "box_px": [200, 240, 260, 300]}]}))
    r = _runner(
        "analyze", str(root), "--view", "sagittal", "--task", "ground", "--question", "bone", "--backend",
        builtin_server, "--out", str(tmp_path / "run"), "--export-sr", str(tmp_path / "sr.dcm"), "--review",
        str(review), "--export-table", str(tmp_path / "t.csv"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "run" / "findings.json").read_text())
    assert _dciodvfy(tmp_path / "sr.dcm")[0] == []
    sr = hd.sr.srread(str(tmp_path / "sr.dcm"))
    g = sr.content.get_planar_roi_measurement_groups()[0]
    assert g.roi.graphic_type == hd.sr.GraphicTypeValues3D.POLYLINE
    assert g.roi.ReferencedFrameOfReferenceUID == uids["frame"]
    lps = g.roi.value
    ras = lps[:4] * np.array([-1, -1, 1])
    want = _corners(data["pixel_to_ras"], [200, 240, 260, 300])  # the corrected box, not the engine's
    assert np.abs(ras - want).max() < 1e-3
    row = next(iter(csv.DictReader((tmp_path / "t.csv").open())))
    assert row["status"] == "edited"
    ctx = S.open_mrb(str(tmp_path / "run" / "scene.mrb"), str(tmp_path / "unpacked"))
    try:
        roi = R.finding_rois(ctx.scene)[0]
        assert R.status(roi) == R.EDITED and roi.GetAttribute(R.TIME_ATTR)
        orig = R.original_geometry(roi)
        assert orig is not None and np.allclose(orig[0], data["findings"][0]["roi_center_ras"], atol=1e-3)
    finally:
        S.close(ctx)


def test_non_dicom_source_sr_refused_in_one_line_other_exports_written(ct_phantom_path, builtin_server, tmp_path):
    """An NRRD volume (the synthetic CT: small, so the test is quick) has no study to reference."""
    r = _runner(
        "analyze", str(ct_phantom_path), "--slice", "30", "--backend", builtin_server, "--out", str(tmp_path / "run"),
        "--export-sr", str(tmp_path / "sr.dcm"), "--export-table", str(tmp_path / "t.csv"), "--scene", "none",
    )  # fmt: skip
    assert r.returncode == 2
    errs = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(errs) == 1 and "not DICOM" in errs[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "sr.dcm").exists() and (tmp_path / "t.csv").exists() and (tmp_path / "t.json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"findings": [{"id": "F99", "status": "accepted"}]}))
    r = _runner("analyze", str(ct_phantom_path), "--slice", "30", "--backend", builtin_server, "--out",
                str(tmp_path / "run2"), "--review", str(bad), "--scene", "none")  # fmt: skip
    assert r.returncode == 2 and "no finding 'F99'" in r.stderr and "Traceback" not in r.stderr


def _plane_corners(center, size, axes, offset_mm, slice_normal):
    """The corners (x0y0, x1y0, x1y1, x0y1) of a 3D finding's box (findings.json) in the slice plane at
    ``offset_mm`` along ``slice_normal`` (Slicer's slice offset: axial +S, sagittal -R)."""
    c = np.asarray(center, float)
    a = np.asarray(axes, float)  # columns: the view's x, y and normal in RAS
    ux, uy, n = (a[:, i] / np.linalg.norm(a[:, i]) for i in range(3))
    s = np.asarray(slice_normal, float)
    c = c + n * (offset_mm - float(np.dot(c, s))) / float(np.dot(n, s))
    hx, hy = ux * size[0] / 2, uy * size[1] / 2
    return np.array([c - hx - hy, c + hx - hy, c + hx + hy, c - hx + hy])


@pytest.fixture(scope="module")
def sweep_exports(dicom_folder, builtin_server, tmp_path_factory):
    """An axial and a sagittal sweep of the DICOM series (3 slices each) with every export flag."""
    root, _ = dicom_folder
    out = tmp_path_factory.mktemp("sweep-export")
    runs = {}
    for view, rng in (("axial", "3:6"), ("sagittal", "190:193")):
        d = out / view
        r = _runner(
            "sweep", str(root), "--view", view, "--range", rng, "--task", "ground", "--question", "bone",
            "--backend", builtin_server, "--out", str(d / "run"), "--scene", "none", "--export-sr", str(d / "sr.dcm"),
            "--export-table", str(d / "t.csv"), "--export-markups", str(d / "mk"),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        runs[view] = d
    return runs


def test_sweep_exports_axial_sr_on_the_best_slice_table_and_markups(sweep_exports, dicom_folder):
    d = sweep_exports["axial"]
    data = json.loads((d / "run" / "findings.json").read_text())
    assert data["findings"], "the built-in engine found nothing in the swept slices"
    assert _dciodvfy(d / "sr.dcm")[0] == []
    sr = hd.sr.srread(str(d / "sr.dcm"))
    files = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
        for p in (dicom_folder[0] / "sub" / "ct").iterdir()
    }
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(data["findings"])
    for g, f in zip(groups, data["findings"], strict=True):
        # the acquisition plane: a 2D POLYLINE on the instance of the finding's best slice
        assert g.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        ref = g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        ds = pydicom.dcmread(files[ref], stop_before_pixels=True)
        best = f["slice_offsets_mm"][f["slices"].index(f["best_slice"])]
        assert abs(float(ds.ImagePositionPatient[2]) - best) < 1e-3
        back = np.array([_scoord_to_ras(ds, c, rr) for c, rr in g.roi.value[:4]])
        want = _plane_corners(f["center_ras"], f["size_mm"], f["axes"], best, (0, 0, 1))
        assert np.abs(back - want).max() <= 0.5 * min(float(v) for v in ds.PixelSpacing)
    rows = list(csv.DictReader((d / "t.csv").open()))
    assert len(rows) == len(data["findings"]) and {r["status"] for r in rows} == {"accepted"}
    for row, f in zip(rows, data["findings"], strict=True):
        assert float(row["size_x_mm"]) == pytest.approx(f["size_mm"][0], abs=1e-3)
    assert sorted(p.name for p in (d / "mk").iterdir()) == sorted(f"{r['id']}.mrk.json" for r in rows)


def test_sweep_exports_sagittal_sr_as_scoord3d(sweep_exports, dicom_folder):
    d = sweep_exports["sagittal"]
    data = json.loads((d / "run" / "findings.json").read_text())
    assert data["findings"], "the built-in engine found nothing in the swept slices"
    assert _dciodvfy(d / "sr.dcm")[0] == []
    sr = hd.sr.srread(str(d / "sr.dcm"))
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(data["findings"])
    for g, f in zip(groups, data["findings"], strict=True):
        assert g.roi.graphic_type == hd.sr.GraphicTypeValues3D.POLYLINE
        assert g.roi.ReferencedFrameOfReferenceUID == dicom_folder[1]["frame"]
        ras = g.roi.value[:4] * np.array([-1, -1, 1])
        best = f["slice_offsets_mm"][f["slices"].index(f["best_slice"])]
        # Slicer's Sagittal preset looks from the patient's left: its slice normal is -R (SliceToRAS column 2)
        want = _plane_corners(f["center_ras"], f["size_mm"], f["axes"], best, (-1, 0, 0))
        assert np.abs(ras - want).max() < 1e-2


def test_sweep_range_with_a_step_is_one_clear_line(dicom_folder, builtin_server, tmp_path):
    r = _runner("sweep", dicom_folder[0], "--range", "2:8:2", "--backend", builtin_server, "--out", tmp_path / "r")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "minigptmed-slicer: error: range must look like A:B with whole slice numbers (a step goes in --step), "
        "got '2:8:2'"
    )
