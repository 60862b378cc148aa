"""pytest fixtures of the panel tests (loaded with ``pytest_plugins = ["panel_fixtures"]``): a real slicer-core scene
with a synthetic CT volume in HU (conftest.ct_phantom_path: nodules on every axial slice) in three slice views, the real servers of the scenarios (panel_servers.py), the scenarios'
environment driven by pytest-qt (``env``), and a real panel talking to the built-in engine (``panel``)."""

from __future__ import annotations

import pytest
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib import scene as S
from MiniGPTMedSlicerQt.qt_compat import qt
from panel_helpers import make_panel
from panel_scenarios import Env, Ui
from panel_servers import panel_servers


@pytest.fixture(scope="module")
def mrml(ct_phantom_path):
    ctx = S.create_scene()
    vol = S.load_volume(ctx, str(ct_phantom_path))
    for name, orient in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        S.add_slice_view(ctx, vol, name, orient, (256, 256))
    yield ctx
    S.close(ctx)


@pytest.fixture(scope="session")
def small_dicom_dir(chest_ct_path, tmp_path_factory) -> str:
    """A 4-slice CT series (512 rows x 400 columns) from the real chest CT: the panel's SR export needs DICOM."""
    from dicom_fixtures import write_ct_series

    folder = tmp_path_factory.mktemp("panel-dicom")
    write_ct_series(chest_ct_path, folder, slices=(70, 74))
    return str(folder)


@pytest.fixture(scope="session")
def servers():
    with panel_servers() as s:
        yield s


class QtBotUi(Ui):
    """The scenarios' clicks and waits through pytest-qt: real mouse events (QTest) and qtbot's event-loop waits."""

    def __init__(self, qtbot):
        self.qtbot = qtbot

    def click(self, button) -> None:
        self.qtbot.mouseClick(button, qt.Qt.LeftButton)

    def click_cell(self, table, row: int, column: int = 0) -> None:
        rect = table.visualItemRect(table.item(row, column))
        self.qtbot.mouseClick(table.viewport(), qt.Qt.LeftButton, pos=rect.center())

    def wait(self, ms: int) -> None:
        self.qtbot.wait(int(ms))

    def wait_until(self, cond, timeout_ms: int = 20000) -> None:
        self.qtbot.waitUntil(lambda: bool(cond()), timeout=timeout_ms)


@pytest.fixture
def env(qtbot, mrml, servers, tmp_path, small_dicom_dir):
    e = Env(
        mrml=mrml,
        ui=QtBotUi(qtbot),
        urls=servers.urls,
        tmp_dir=str(tmp_path),
        register=qtbot.addWidget,
        slow_started=lambda: servers.slow.started,
        dicom_dir=small_dicom_dir,
    )
    yield e
    e.close()


@pytest.fixture
def panel(qtbot, mrml, builtin_server, tmp_path):
    M.clear_results(mrml.scene)
    settings = qt.QSettings(str(tmp_path / "settings.ini"), qt.QSettings.IniFormat)
    p = make_panel(qtbot, mrml, builtin_server, settings=settings)
    yield p
    p.cleanup()
