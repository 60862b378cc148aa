"""A real PACS: Orthanc (Debian orthanc + orthanc-dicomweb) on free loopback ports with a temporary configuration and
storage, started once per session. Orthanc -> runner (QIDO, WADO) -> SR -> Orthanc (STOW), then QIDO back; --series
picks another series of the study; a STOW that Orthanc refuses (a Lua ReceivedInstanceFilter drops SRs of one study)
is one line and exit 2, and the local SR stays. The runner runs in-process, except for one real subprocess that
checks the CLI contract (one line on stderr, exit 2, no traceback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from conftest import ROOT, run_runner
from dicom_fixtures import N_SLICES, write_ct_series
from dicomweb_client.api import DICOMwebClient

from backend.server_thread import free_port

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
# the SR of this study is refused (the Lua filter below): pydicom's CT_small.dcm
REFUSED_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
LUA_FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.Modality == 'SR' and dicom.StudyInstanceUID == '%s' then
    return false
  end
  return true
end
"""


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    exe = shutil.which("Orthanc")
    assert exe, "Orthanc missing: make test installs it (apt-get install orthanc orthanc-dicomweb)"
    d = tmp_path_factory.mktemp("orthanc")
    (d / "filter.lua").write_text(LUA_FILTER % REFUSED_STUDY)
    http, dicom = free_port(), free_port()
    cfg = {
        "Name": "minigptmed-test", "StorageDirectory": str(d / "db"), "IndexDirectory": str(d / "db"),
        "HttpPort": http, "DicomPort": dicom, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "HttpBindAddress": "127.0.0.1", "DicomServerEnabled": False, "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "LuaScripts": [str(d / "filter.lua")],
    }  # fmt: skip
    (d / "orthanc.json").write_text(json.dumps(cfg))
    log = open(d / "orthanc.log", "w")
    proc = subprocess.Popen([exe, str(d / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http}"
    try:
        for _ in range(300):
            try:
                if requests.get(base + "/system", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, (d / "orthanc.log").read_text()
            time.sleep(0.05)
        yield base + "/dicom-web"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="session")
def pacs_study(orthanc, dicom_folder, chest_ct_path, ct_small_path, tmp_path_factory):
    """Uploaded once: the 10-slice CT series and, in the same study, a 3-slice one; MR_small (its own study);
    CT_small (the study whose SR Orthanc refuses)."""
    root, uids = dicom_folder
    extra = write_ct_series(
        chest_ct_path, tmp_path_factory.mktemp("second-series"), slices=(70, 73), study=uids["study"]
    )
    files = sorted((root / "sub" / "ct").glob("*.dcm"))
    others = [root / "MR_small.dcm", ct_small_path, *sorted(extra["dir"].glob("*.dcm"))]
    DICOMwebClient(orthanc).store_instances([pydicom.dcmread(p) for p in [*files, *others]])
    return {**uids, "second_series": extra["series"], "files": files}


def test_orthanc_runner_sr_orthanc(orthanc, pacs_study, builtin_server, tmp_path):
    uids = pacs_study
    client = DICOMwebClient(orthanc)
    r = run_runner(
        "analyze", "--dicomweb", orthanc, "--study", uids["study"], "--slice", "8", "--task", "ground", "--question",
        "bone", "--backend", builtin_server, "--out", tmp_path / "run", "--store-sr", "--scene", "none",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"DICOMweb series {uids['series']} (CT, {N_SLICES} instance(s)), the one with the most" in r.stderr
    data = json.loads((tmp_path / "run" / "findings.json").read_text())
    assert data["findings"]
    srs = client.search_for_series(study_instance_uid=uids["study"], search_filters={"Modality": "SR"})
    assert len(srs) == 1
    sr_uid = srs[0]["0020000E"]["Value"][0]
    (ds,) = client.retrieve_series(study_instance_uid=uids["study"], series_instance_uid=sr_uid)
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ev.SeriesInstanceUID == uids["series"]
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in uids["files"]}
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(data["findings"])
    for g, f in zip(groups, data["findings"], strict=True):
        ref = g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        img = pydicom.dcmread(by_uid[ref], stop_before_pixels=True)
        ipp = np.array([float(v) for v in img.ImagePositionPatient])
        iop = np.array([float(v) for v in img.ImageOrientationPatient])
        dr, dc = (float(v) for v in img.PixelSpacing)
        m = np.asarray(data["pixel_to_ras"], float)
        x0, y0, x1, y1 = f["box_px"]
        want = np.array([(m @ [u, v, 0, 1])[:3] for u, v in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))])
        lps = np.array([ipp + iop[:3] * dc * (c - 0.5) + iop[3:] * dr * (rr - 0.5) for c, rr in g.roi.value[:4]])
        assert np.abs(lps * [-1, -1, 1] - want).max() <= 0.5 * min(dr, dc)


@pytest.mark.parametrize("how", ["number", "uid"])
def test_series_picks_another_series_of_the_study(orthanc, pacs_study, builtin_server, tmp_path, how):
    uids = pacs_study
    pick = "2" if how == "number" else uids["second_series"]  # 2: the second of the study's image series
    r = run_runner(
        "analyze", "--dicomweb", orthanc, "--study", uids["study"], "--series", pick, "--task", "report",
        "--backend", builtin_server, "--out", tmp_path / "run", "--scene", "none",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"DICOMweb series {uids['second_series']} (CT, 3 instance(s)), chosen" in r.stderr
    assert "volume 400x512x3" in r.stderr  # the 3-slice series was loaded, not the 10-slice one
    bad = run_runner("analyze", "--dicomweb", orthanc, "--study", uids["study"], "--series", "9",
                     "--backend", builtin_server, "--out", tmp_path / "bad")  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        f"minigptmed-slicer: error: {orthanc}: study {uids['study']} has no series 9"
    )


def test_stow_refused_is_one_line_and_the_local_sr_stays(orthanc, pacs_study, builtin_server, tmp_path):
    r = run_runner(
        "analyze", "--dicomweb", orthanc, "--study", REFUSED_STUDY, "--task", "ground", "--question", "bone",
        "--backend", builtin_server, "--out", tmp_path / "run", "--store-sr", "--scene", "none",
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith(f"minigptmed-slicer: error: {orthanc}: STOW failed") and "HTTP 200" in err, err
    assert "does not hold SOP instance" in err and "Traceback" not in r.stderr
    local = tmp_path / "run" / "sr.dcm"
    assert local.is_file() and pydicom.dcmread(local).StudyInstanceUID == REFUSED_STUDY  # nothing lost locally
    held = DICOMwebClient(orthanc).search_for_series(
        study_instance_uid=REFUSED_STUDY, search_filters={"Modality": "SR"}
    )
    assert held == []


def test_pacs_errors_are_one_line_with_url_and_status(orthanc, pacs_study, builtin_server, tmp_path):
    study = pacs_study["study"]
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    for url, uid, want in (
        (orthanc, "1.2.3.4.5", "no series in study 1.2.3.4.5"),
        (orthanc.replace("/dicom-web", "/nothing-here"), study, "HTTP 404"),
    ):
        r = run_runner("analyze", "--dicomweb", url, "--study", uid, "--backend", builtin_server,
                       "--out", tmp_path / "x")  # fmt: skip
        assert r.returncode == 2, r.stderr
        err = r.stderr.strip().splitlines()[-1]
        assert err.startswith("minigptmed-slicer: error: " + url) and want in err
    # the CLI contract once as a real subprocess: one line on stderr, exit 2, no traceback
    p = subprocess.run(
        [sys.executable, "-m", "headless.runner", "analyze", "--dicomweb", down, "--study", study, "--backend",
         builtin_server, "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("minigptmed-slicer: error: " + down) and "cannot connect" in err
    assert not (tmp_path / "x" / "findings.json").exists()
