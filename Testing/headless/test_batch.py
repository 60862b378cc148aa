"""``minigptmed-slicer batch`` on a cohort made from the real volumes: the chest CT (cropped) as NIfTI and as a DICOM
series, the MNI template (cropped, as NRRD), a cut-short .nii.gz; a folder and a CSV; resume; --jobs 2; Ctrl-C as
SIGINT to a real subprocess."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT
from dicom_fixtures import write_ct_series

from headless.runner import main

CT_SLICES = (60, 84)  # 24 of the chest CT's 133 axial slices
CT_COLUMNS = (56, 312)  # 256 of its 512 columns (the right lung and the mediastinum): 256 x 512 in-plane


@pytest.fixture(scope="module")
def cohort(chest_ct_path, mni_path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    img = sitk.ReadImage(str(chest_ct_path))
    (root / "ct").mkdir()
    nifti = root / "ct" / "chest.nii"  # uncompressed: quick to write and to read back
    sitk.WriteImage(img[CT_COLUMNS[0] : CT_COLUMNS[1], :, CT_SLICES[0] : CT_SLICES[1]], str(nifti))
    n = CT_SLICES[1] - CT_SLICES[0]
    write_ct_series(nifti, root / "dicom" / "chest", slices=(0, n), columns=(0, CT_COLUMNS[1] - CT_COLUMNS[0]))
    (root / "mr").mkdir()
    mni = sitk.ReadImage(str(mni_path))[:, :, 80:100]
    sitk.WriteImage(mni, str(root / "mr" / "mni.nrrd"))
    (root / "broken").mkdir()
    sitk.WriteImage(mni, str(root / "broken" / "cut.nii.gz"))
    data = (root / "broken" / "cut.nii.gz").read_bytes()
    (root / "broken" / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not a volume: ignored")
    return root


def _batch(capsys, *args: str) -> tuple[int, str]:
    code = main(["batch", *args])
    return code, capsys.readouterr().err


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def _findings(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "findings.jsonl").read_text().splitlines()]


def _ct_slice_s(path: Path, k: int) -> float:
    """The S coordinate (RAS) of axial slice k, from the NIfTI header with nibabel (not Slicer)."""
    return float((nib.load(str(path)).affine @ [0, 0, k, 1])[2])


def test_folder_results_failure_row_and_resume(cohort, tmp_path, builtin_server, capsys):
    out = tmp_path / "out"
    code, err = _batch(
        capsys,
        str(cohort),
        "--task",
        "report",
        "--jobs",
        "2",
        "--backend",
        builtin_server,
        "--view-size",
        "256",
        "--out",
        str(out),
    )
    assert code == 1, err  # one case failed
    rows = _summary(out)
    assert sorted(rows) == ["broken/cut.nii.gz", "ct/chest.nii", "dicom/chest", "mr/mni.nrrd"]
    broken = rows["broken/cut.nii.gz"]
    assert broken["status"] == "failed" and "cut short" in broken["error"] and "\n" not in broken["error"]
    assert "broken/cut.nii.gz: failed:" in err and "Traceback" not in err
    assert "batch: 100%" in err and "4/4" in err  # the progress bar (tqdm)
    middle = (CT_SLICES[1] - CT_SLICES[0]) // 2
    s_mid = _ct_slice_s(cohort / "ct" / "chest.nii", middle)
    for path in ("ct/chest.nii", "dicom/chest", "mr/mni.nrrd"):
        r = rows[path]
        assert r["status"] == "ok" and r["engine"] == "builtin" and r["error"] == "", r
        case = out / "cases" / r["id"]
        data = json.loads((case / "findings.json").read_text())
        assert data["text"] == r["text"] and len(data["findings"]) == int(r["findings"])
        assert (case / "input.png").stat().st_size > 1000 and (case / "view.png").stat().st_size > 1000
        assert not (case / "scene.mrb").exists()  # batch default: --scene none
    # the NIfTI and the DICOM series are the same slices: the same middle slice, where the header puts it
    for path in ("ct/chest.nii", "dicom/chest"):
        assert float(rows[path]["slice_offset_mm"]) == pytest.approx(s_mid, abs=1e-3)
        assert "CT image of" in rows[path]["text"]
    assert "Unknown-modality image" in rows["mr/mni.nrrd"]["text"]
    assert not (out / "cases" / broken["id"] / "findings.json").exists()
    assert not [p for p in (out / "cases").iterdir() if p.name.endswith(".partial")]

    # resume: the three finished cases are kept as they are, the failed one is tried again
    stamps = {p: (out / "cases" / rows[p]["id"] / "case.json").stat().st_mtime_ns for p in rows}
    code, err = _batch(
        capsys, str(cohort), "--task", "report", "--backend", builtin_server, "--view-size", "256", "--out", str(out)
    )
    assert code == 1 and "3 of 4 case(s) already finished" in err, err
    again = _summary(out)
    assert {p: r["id"] for p, r in again.items()} == {p: r["id"] for p, r in rows.items()}  # stable ids
    for p in ("ct/chest.nii", "dicom/chest", "mr/mni.nrrd"):
        assert (out / "cases" / rows[p]["id"] / "case.json").stat().st_mtime_ns == stamps[p]
        assert again[p] == rows[p]
    assert again["broken/cut.nii.gz"]["status"] == "failed"


def test_csv_rows_slice_question_and_failures(cohort, tmp_path, builtin_server, capsys):
    table = tmp_path / "cohort.csv"
    rel = os.path.relpath(cohort, tmp_path)
    table.write_text(
        "path,slice,question\n"
        f"{rel}/ct/chest.nii,5,nodule\n"
        f"{rel}/dicom/chest,17,\n"
        f"{rel}/mr/mni.nrrd,,\n"  # detect on MR: the built-in engine answers 501 (detect needs HU)
        f"{rel}/missing.nii.gz,,\n"
    )
    out = tmp_path / "out"
    code, err = _batch(
        capsys,
        str(table),
        "--task",
        "detect",
        "--jobs",
        "2",
        "--backend",
        builtin_server,
        "--view-size",
        "256",
        "--out",
        str(out),
    )
    assert code == 1, err
    rows = _summary(out)
    assert list(rows) == [f"{rel}/{p}" for p in ("ct/chest.nii", "dicom/chest", "mr/mni.nrrd", "missing.nii.gz")]
    ct, dcm, mr, missing = rows.values()
    assert ct["status"] == dcm["status"] == "ok", (ct, dcm)
    assert ct["slice"] == "5" and ct["question"] == "nodule" and dcm["slice"] == "17"
    nifti = cohort / "ct" / "chest.nii"
    assert float(ct["slice_offset_mm"]) == pytest.approx(_ct_slice_s(nifti, 5), abs=1e-3)
    assert float(dcm["slice_offset_mm"]) == pytest.approx(_ct_slice_s(nifti, 17), abs=1e-3)
    assert mr["status"] == "failed" and "501" in mr["error"], mr
    assert missing["status"] == "failed" and "no such file" in missing["error"]
    # one line per finding, each naming its case; the count matches the case's own findings.json
    lines = _findings(out)
    for r in (ct, dcm):
        data = json.loads((out / "cases" / r["id"] / "findings.json").read_text())
        mine = [ln for ln in lines if ln["case"] == r["id"]]
        assert len(mine) == len(data["findings"]) == int(r["findings"])
        assert [m["box_px"] for m in mine] == [f["box_px"] for f in data["findings"]]
    assert len(lines) == int(ct["findings"]) + int(dcm["findings"])

    # bad tables are refused before anything runs: one line, exit 2
    bad = tmp_path / "bad.csv"
    bad.write_text("file,slice\na.nii,1\n")
    code, err = _batch(capsys, str(bad), "--out", str(tmp_path / "bad"))
    assert code == 2 and err.strip().count("\n") == 0 and "no 'path' column" in err, err
    bad.write_text("path,slice\na.nii,middle\n")
    code, err = _batch(capsys, str(bad), "--out", str(tmp_path / "bad"))
    assert code == 2 and "line 2: slice 'middle' is not a whole number" in err, err


def test_ctrl_c_keeps_finished_cases_and_resume_redoes_the_rest(cohort, tmp_path, builtin_server, capsys):
    many = tmp_path / "many"
    many.mkdir()
    n = 6
    for k in range(n):
        os.link(cohort / "mr" / "mni.nrrd", many / f"mr{k}.nrrd")
    out = tmp_path / "out"
    args = [
        str(many),
        "--task",
        "report",
        "--jobs",
        "1",
        "--backend",
        builtin_server,
        "--view-size",
        "256",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "MiniGPTMedSlicer")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "headless.runner", "batch", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a suite started in the background (nohup, cmd &) runs with SIGINT ignored, and a child inherits that, so
        # Python would install no Ctrl-C handler: give the runner the default disposition a terminal's Ctrl-C meets
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            summary = out / "summary.csv"
            if summary.exists() and summary.read_text().count(",ok,") >= 1:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted:" in err.strip().splitlines()[-1], err
    rows = _summary(out)
    assert 1 <= len(rows) < n and all(r["status"] == "ok" for r in rows.values()), rows
    cases = out / "cases"
    assert sorted(p.name for p in cases.iterdir()) == sorted(r["id"] for r in rows.values())  # no half-done case
    for r in rows.values():
        assert {"case.json", "findings.json", "input.png", "view.png"} <= {p.name for p in (cases / r["id"]).iterdir()}
    stamps = {r["id"]: (cases / r["id"] / "case.json").stat().st_mtime_ns for r in rows.values()}

    code, err = _batch(capsys, *args)
    assert code == 0, err
    assert f"{len(rows)} of {n} case(s) already finished" in err
    final = _summary(out)
    assert len(final) == n and all(r["status"] == "ok" for r in final.values())
    for cid, t in stamps.items():
        assert (cases / cid / "case.json").stat().st_mtime_ns == t
    texts = {r["text"] for r in final.values()}
    assert len(texts) == 1  # the same volume n times: the same answer
    assert np.all([(cases / r["id"] / "view.png").exists() for r in final.values()])


def test_sweep_cases_merge_in_3d(cohort, ct_phantom_path, tmp_path, builtin_server, capsys):
    """A sweep per case: the synthetic CT phantom (solid 6 mm spheres centred every 10 mm along S, from S = -15 mm)
    and the real CT's DICOM series."""
    table = tmp_path / "sweep.csv"
    table.write_text(f"path\n{ct_phantom_path}\n{cohort / 'dicom' / 'chest'}\n")
    out = tmp_path / "out"
    args = ["--sweep", "--task", "detect", "--range", "0:24", "--step", "2", "--backend", builtin_server]
    code, err = _batch(capsys, str(table), *args, "--view-size", "256", "--out", str(out))
    assert code == 0, err
    phantom, dicom = _summary(out).values()
    assert phantom["status"] == dicom["status"] == "ok" and phantom["slices"] == "12" and dicom["slices"] == "12"
    data = json.loads((out / "cases" / phantom["id"] / "findings.json").read_text())
    assert data["slices"] == list(range(0, 24, 2)) and phantom["text"] == data["summary"]
    assert len(data["findings"]) == int(phantom["findings"]) >= 1
    # the spheres' centres in RAS from the phantom's definition (conftest: voxel (x, y, z), LPS origin (80, 64, -20),
    # 1 mm voxels): i even at (45, 55), odd at (115, 65), z = 5 + 10 i
    centres = [
        np.array([-(80.0 + (45 if i % 2 == 0 else 115)), -(64.0 + (55 if i % 2 == 0 else 65)), -20.0 + cz])
        for i, cz in enumerate(range(5, 60, 10))
    ]
    for f in data["findings"]:
        assert min(np.linalg.norm(np.array(f["center_ras"]) - c) for c in centres) < 6.0, f  # inside a sphere
    lines = [ln for ln in _findings(out) if ln["case"] == phantom["id"]]
    assert [ln["center_ras"] for ln in lines] == [f["center_ras"] for f in data["findings"]]
    code, err = _batch(capsys, str(table), *args, "--out", str(tmp_path / "bad"), "--task", "report")
    assert code == 2 and "a sweep asks detect or ground" in err
