"""Each bad input of the runner gives exactly one error line on stderr and exit code 2: no VTK dumps, no traceback,
no zero-filled volume. The runner runs in this process (``main``); ``capfd`` sees what VTK writes to fd 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from MiniGPTMedSlicerLib.merge3d import Finding3D
from MiniGPTMedSlicerLib.sweep import SweepPlan, summarize

from backend.engines.builtin import BuiltinEngine
from backend.server_thread import ServerThread
from backend.settings import ServerSettings
from headless.runner import main


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, chest_ct_path, ct_small_path, anatomical_path):
    import nibabel as nib
    import SimpleITK as sitk
    from PIL import Image

    d = tmp_path_factory.mktemp("bad")
    data = chest_ct_path.read_bytes()
    (d / "cut.nii.gz").write_bytes(data[: len(data) // 10])  # the real chest CT, cut short
    dcm = ct_small_path.read_bytes()
    (d / "cut.dcm").write_bytes(dcm[: len(dcm) - 3000])  # a real CT slice missing part of its pixel data
    sitk.WriteImage(sitk.ReadImage(str(anatomical_path)), str(d / "whole.nrrd"))
    raw = (d / "whole.nrrd").read_bytes()
    (d / "cut.nrrd").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8, 3), np.float32), np.eye(4)), str(d / "four_d.nii.gz"))
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(d / "picture.png")
    (d / "notes.txt").write_text("not a volume\n")
    (d / "a_file").write_text("x")
    return d


def _one_error_line(capfd, rc: int) -> str:
    err = capfd.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "ERR|" not in err and "vtk" not in err.lower(), err
    others = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[minigptmed-slicer] ")]
    assert len(others) == 1, err  # progress lines aside, one line
    assert others[0].startswith("minigptmed-slicer: error: ")
    return others[0]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cut.nii.gz", "cut short"),
        ("cut.dcm", "bytes of pixel data for 32768"),
        ("cut.nrrd", "expected"),
        ("four_d.nii.gz", "4D image"),
        ("picture.png", "2D image"),
        ("notes.txt", "cannot read this file as a volume"),
    ],
)
def test_unreadable_and_incomplete_volumes_fail_in_one_line(bad_inputs, tmp_path, capfd, name, expected):
    rc = main(["analyze", str(bad_inputs / name), "--out", str(tmp_path / "o"), "--view-size", "64"])
    line = _one_error_line(capfd, rc)
    assert expected in line and name in line
    assert not (tmp_path / "o" / "findings.json").exists()  # nothing analysed


def test_the_whole_nrrd_still_loads(bad_inputs, builtin_server, tmp_path, capfd):
    rc = main(
        [
            "analyze",
            str(bad_inputs / "whole.nrrd"),
            "--backend",
            builtin_server,
            "--task",
            "report",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0 and (tmp_path / "findings.json").is_file()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["sweep", "--batch-size", "0"], "--batch-size 0: use 1 or more"),
        (["sweep", "--batch-size", "-3"], "--batch-size -3"),
        (["analyze", "--window", "-5"], "window width must be > 0"),
        (["analyze", "--view-size", "20000"], "--view-size 20000: use 16..4096"),
        (["sweep", "--range", "5:5"], "range 5:5 is empty"),
        (["sweep", "--range", "9:3"], "is empty"),
        (["analyze", "--out", "{file}"], "a file is in the way"),
        (["analyze", "--out", "{file}/sub"], "cannot create this folder"),
    ],
)
def test_bad_options_fail_early_in_one_line(
    anatomical_path, bad_inputs, builtin_server, tmp_path, capfd, args, expected
):
    args = [a.replace("{file}", str(bad_inputs / "a_file")) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "o")]
    rc = main([args[0], str(anatomical_path), "--backend", builtin_server, "--view-size", "64", *out, *args[1:]])
    assert expected in _one_error_line(capfd, rc)


def test_401_names_the_flag_and_the_variable(anatomical_path, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("MINIGPTMED_TOKEN", raising=False)
    with ServerThread(BuiltinEngine(), ServerSettings(token="s3cret")) as url:
        rc = main(["analyze", str(anatomical_path), "--backend", url, "--token", "", "--out", str(tmp_path)])
        assert "pass --token or set MINIGPTMED_TOKEN" in _one_error_line(capfd, rc)
        rc = main(["analyze", str(anatomical_path), "--backend", url, "--token", "nope", "--out", str(tmp_path)])
        assert "refused the token" in _one_error_line(capfd, rc)


def test_truncated_file_as_a_real_subprocess(bad_inputs, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "headless.runner", "analyze", str(bad_inputs / "cut.nii.gz"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("[minigptmed-slicer] ")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "holds" in lines[0] and "no voxels are invented" in lines[0]


def test_single_slice_findings_say_slice_not_a_range():
    plan = SweepPlan(indices=[7, 8, 9, 10], offsets_mm=[0.0, 1.0, 2.0, 3.0], slice_count=20, spacing_mm=1.0)
    one = Finding3D("nodule", [2], [(0, 0, 4, 4)], [0.5], size_mm=(4.0, 4.0, 1.0), isolated=True)
    two = Finding3D("mass", [1, 3], [(0, 0, 4, 4)] * 2, [0.5, 0.6], size_mm=(4.0, 4.0, 3.0))
    text = summarize([one, two], plan, "axial")
    assert "mm, slice 9\n" in text and "slices 9–9" not in text and "slices 8–10" in text
