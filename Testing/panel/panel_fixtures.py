"""pytest fixtures of the panel tests (loaded with ``pytest_plugins = ["panel_fixtures"]``): a real slicer-core scene
with the real MNI volume in three slice views, and the real panel talking to the built-in engine behind a real server."""

from __future__ import annotations

import pytest
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib import scene as S
from MiniGPTMedSlicerQt.qt_compat import qt
from panel_helpers import make_panel


@pytest.fixture(scope="module")
def mrml(mni_path):
    ctx = S.create_scene()
    vol = S.load_volume(ctx, str(mni_path))
    for name, orient in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        S.add_slice_view(ctx, vol, name, orient, (256, 256))
    yield ctx
    S.close(ctx)


@pytest.fixture
def panel(qtbot, mrml, builtin_server, tmp_path):
    M.clear_results(mrml.scene)
    settings = qt.QSettings(str(tmp_path / "settings.ini"), qt.QSettings.IniFormat)
    p = make_panel(qtbot, mrml, builtin_server, settings=settings)
    yield p
    p.cleanup()
