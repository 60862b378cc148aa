"""A real PACS: Orthanc (Debian orthanc + orthanc-dicomweb) on free loopback ports with a temporary configuration and
storage, started once for this module. Orthanc -> runner (QIDO, WADO) -> SR -> Orthanc (STOW), then QIDO back."""

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
from conftest import ROOT
from dicomweb_client.api import DICOMwebClient

from backend.server_thread import free_port

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    exe = shutil.which("Orthanc")
    assert exe, "Orthanc missing: make test installs it (apt-get install orthanc orthanc-dicomweb)"
    d = tmp_path_factory.mktemp("orthanc")
    http, dicom = free_port(), free_port()
    cfg = {
        "Name": "minigptmed-test", "StorageDirectory": str(d / "db"), "IndexDirectory": str(d / "db"),
        "HttpPort": http, "DicomPort": dicom, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "HttpBindAddress": "127.0.0.1", "DicomServerEnabled": False, "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
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


def _runner(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "headless.runner", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_orthanc_runner_sr_orthanc(orthanc, dicom_folder, builtin_server, tmp_path):
    root, uids = dicom_folder
    client = DICOMwebClient(orthanc)
    files = sorted((root / "sub" / "ct").glob("*.dcm"))
    client.store_instances([pydicom.dcmread(p) for p in files] + [pydicom.dcmread(root / "MR_small.dcm")])
    r = _runner(
        "analyze", "--dicomweb", orthanc, "--study", uids["study"], "--slice", "8", "--task", "ground", "--question", "bone",
        "--backend", builtin_server, "--out", str(tmp_path / "run"), "--store-sr",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"DICOMweb series {uids['series']} (CT, 20 instance(s))" in r.stderr
    data = json.loads((tmp_path / "run" / "findings.json").read_text())
    assert data["findings"]
    srs = client.search_for_series(study_instance_uid=uids["study"], search_filters={"Modality": "SR"})
    assert len(srs) == 1
    sr_uid = srs[0]["0020000E"]["Value"][0]
    (ds,) = client.retrieve_series(study_instance_uid=uids["study"], series_instance_uid=sr_uid)
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ev.SeriesInstanceUID == uids["series"]
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
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


def test_pacs_errors_are_one_line_with_url_and_status(orthanc, dicom_folder, builtin_server, tmp_path):
    uids = dicom_folder[1]
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    for url, study, want in (
        (down, uids["study"], "cannot connect"),
        (orthanc, "1.2.3.4.5", "no series in study 1.2.3.4.5"),
        (orthanc.replace("/dicom-web", "/nothing-here"), uids["study"], "HTTP 404"),
    ):
        r = _runner("analyze", "--dicomweb", url, "--study", study, "--backend", builtin_server,
                    "--out", str(tmp_path / "x"))  # fmt: skip
        assert r.returncode == 2, r.stderr
        err = r.stderr.strip().splitlines()[-1]
        assert err.startswith("minigptmed-slicer: error: " + url) and want in err and "Traceback" not in r.stderr
    assert not (tmp_path / "x" / "findings.json").exists()
