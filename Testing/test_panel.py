"""The real panel (PySide6, offscreen) driven with pytest-qt against a real slicer-core scene with a real volume and
a real backend on a loopback port."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fault_engines import SlowEngine
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib import scene as S
from MiniGPTMedSlicerLib.controller import AnalysisController
from MiniGPTMedSlicerQt.panel import Panel
from MiniGPTMedSlicerQt.qt_compat import qt

from backend.server_thread import ServerThread, free_port


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
    controller = AnalysisController(mrml.scene, lambda: dict(mrml.slice_logics))
    p = Panel(controller, settings=settings)
    qtbot.addWidget(p.widget)
    p.widget.show()
    p.url_edit.setText(builtin_server)
    yield p
    p.cleanup()


def _idle(p: Panel) -> bool:
    return p.job is None and p.analyze_button.isEnabled()


def _select_task(p: Panel, name: str) -> None:
    p.task_combo.setCurrentIndex(p.task_combo.findText(name))


def test_test_connection_shows_engine_model_and_tasks(qtbot, panel):
    qtbot.mouseClick(panel.test_button, qt.Qt.LeftButton)
    qtbot.waitUntil(lambda: _idle(panel), timeout=10000)
    text = panel.connection_label.text()
    assert "builtin" in text and "not a diagnosis" in text and "detect" in text


def test_detect_fills_table_and_scene_and_click_jumps(qtbot, panel, mrml):
    _select_task(panel, "Detect")
    panel.view_combo.setCurrentIndex(panel.view_combo.findText("Red"))
    mrml.slice_logics["Red"].SetSliceOffset(10.0)
    qtbot.mouseClick(panel.analyze_button, qt.Qt.LeftButton)
    assert panel.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: _idle(panel), timeout=20000)
    rows = M.finding_rows(mrml.scene)
    assert len(rows) > 0, panel.status_label.text()
    assert panel.table.rowCount() == len(rows)
    assert "not a diagnosis" in panel.text_edit.toPlainText()
    assert "finding(s) from builtin" in panel.status_label.text()
    # click the last row: the Yellow (sagittal) and Green (coronal) views jump onto that finding, the markup is selected
    r = panel.table.rowCount() - 1
    node_id = panel.table.item(r, 0).data(qt.Qt.UserRole)
    roi = mrml.scene.GetNodeByID(node_id)
    rect = panel.table.visualItemRect(panel.table.item(r, 0))
    qtbot.mouseClick(panel.table.viewport(), qt.Qt.LeftButton, pos=rect.center())
    c = M.roi_center(roi)
    assert roi.GetSelected()
    yellow = mrml.slice_logics["Yellow"].GetSliceNode()
    ras_of_yellow_plane = np.array([yellow.GetSliceToRAS().GetElement(i, 3) for i in range(3)])
    assert abs(ras_of_yellow_plane[0] - c[0]) < 1e-3  # sagittal plane passes through the finding
    # keep earlier results off: a new analysis replaces the previous one
    panel.keep_check.setChecked(False)
    qtbot.mouseClick(panel.analyze_button, qt.Qt.LeftButton)
    qtbot.waitUntil(lambda: _idle(panel), timeout=20000)
    assert len(M.list_results(mrml.scene)) == 1
    qtbot.mouseClick(panel.clear_button, qt.Qt.LeftButton)
    assert panel.table.rowCount() == 0 and M.list_results(mrml.scene) == []


def test_backend_down_gives_clear_message_and_no_change(qtbot, panel, mrml):
    before = mrml.scene.GetNumberOfNodes()
    panel.url_edit.setText(f"http://127.0.0.1:{free_port()}")
    _select_task(panel, "Report")
    qtbot.mouseClick(panel.analyze_button, qt.Qt.LeftButton)
    qtbot.waitUntil(lambda: _idle(panel), timeout=20000)
    assert "Is it running?" in panel.status_label.text()
    assert mrml.scene.GetNumberOfNodes() == before


def test_server_4xx_message_reaches_the_user(qtbot, panel, mrml):
    before = mrml.scene.GetNumberOfNodes()
    _select_task(panel, "Ask")
    panel.question_edit.setText("Is there a haemorrhage?")
    qtbot.mouseClick(panel.analyze_button, qt.Qt.LeftButton)
    qtbot.waitUntil(lambda: _idle(panel), timeout=20000)
    assert "--engine minigptmed" in panel.status_label.text() and "501" in panel.status_label.text()
    panel.question_edit.setText("")
    qtbot.mouseClick(panel.analyze_button, qt.Qt.LeftButton)  # checked before anything is sent
    assert "Type a question" in panel.status_label.text()
    _select_task(panel, "Identify region")
    qtbot.mouseClick(panel.analyze_button, qt.Qt.LeftButton)
    assert "needs an ROI" in panel.status_label.text()
    assert mrml.scene.GetNumberOfNodes() == before


def test_identify_region_uses_a_drawn_roi(qtbot, panel, mrml):
    red = mrml.slice_logics["Red"]
    red.SetSliceOffset(10.0)
    from MiniGPTMedSlicerLib.capture import capture_slice
    from MiniGPTMedSlicerLib.geometry import box_to_plane_roi

    cap = capture_slice(red)
    centre, size, axes = box_to_plane_roi(cap.pixel_to_ras, [100, 100, 140, 130], 4.0)
    roi = M.add_roi(mrml.scene, "my region", centre, size, axes, (1, 1, 0), {}, "my region")
    for key in list(roi.GetAttributeNames() or []):
        roi.RemoveAttribute(key)
    _select_task(panel, "Identify region")
    panel.refresh_regions()
    panel.region_combo.setCurrentIndex(panel.region_combo.findData(roi.GetID()))
    qtbot.mouseClick(panel.analyze_button, qt.Qt.LeftButton)
    qtbot.waitUntil(lambda: _idle(panel), timeout=20000)
    rows = M.finding_rows(mrml.scene)
    assert len(rows) == 1 and "region" in rows[0].label, panel.status_label.text()
    got = mrml.scene.GetNodeByID(rows[0].node_id)
    assert np.allclose(M.roi_center(got), centre, atol=0.05)
    M.remove_node(mrml.scene, roi)


def test_sweep_from_the_panel(qtbot, panel, mrml):
    _select_task(panel, "Sweep volume")
    panel.view_combo.setCurrentIndex(panel.view_combo.findText("Red"))
    panel.range_edit.setText("80:110:3")
    qtbot.mouseClick(panel.analyze_button, qt.Qt.LeftButton)
    qtbot.waitUntil(lambda: _idle(panel), timeout=60000)
    assert "over 10 slices" in panel.status_label.text(), panel.status_label.text()
    assert M.list_results(mrml.scene) and "Sweep of 10 slices" in panel.text_edit.toPlainText()


def test_cancel_and_responsiveness_during_a_slow_request(qtbot, mrml, tmp_path):
    M.clear_results(mrml.scene)
    before = mrml.scene.GetNumberOfNodes()
    with ServerThread(SlowEngine(delay_s=3.0)) as url:
        controller = AnalysisController(mrml.scene, lambda: dict(mrml.slice_logics))
        p = Panel(controller)
        qtbot.addWidget(p.widget)
        p.url_edit.setText(url)
        _select_task(p, "Detect")
        ticks = []
        ticker = qt.QTimer(p.widget)
        ticker.setInterval(20)
        ticker.timeout.connect(lambda: ticks.append(time.monotonic()))
        ticker.start()
        t0 = time.monotonic()
        qtbot.mouseClick(p.analyze_button, qt.Qt.LeftButton)
        assert time.monotonic() - t0 < 1.0  # the click returns at once: the request runs off the GUI thread
        qtbot.wait(1000)
        assert p.job is not None and not p.analyze_button.isEnabled()
        assert len([t for t in ticks if t > t0]) >= 20  # the event loop kept running (20 ms timer, 1 s)
        qtbot.mouseClick(p.cancel_button, qt.Qt.LeftButton)
        assert _idle(p) and "Cancelled" in p.status_label.text()
        qtbot.wait(2500)  # the server finishes its work; the late answer is discarded
        ticker.stop()
        p.cleanup()
    assert mrml.scene.GetNumberOfNodes() == before


def test_settings_are_kept_as_strings(qtbot, mrml, tmp_path):
    path = str(tmp_path / "s.ini")
    settings = qt.QSettings(path, qt.QSettings.IniFormat)
    controller = AnalysisController(mrml.scene, lambda: dict(mrml.slice_logics))
    p = Panel(controller, settings=settings)
    qtbot.addWidget(p.widget)
    p.url_edit.setText("http://127.0.0.1:9")
    p.token_edit.setText("tok")
    p._configure()
    settings.sync()
    p2 = Panel(controller, settings=qt.QSettings(path, qt.QSettings.IniFormat))
    qtbot.addWidget(p2.widget)
    assert p2.url_edit.text() == "http://127.0.0.1:9" and p2.token_edit.text() == "tok"
