"""The real panel (PySide6, offscreen) driven with pytest-qt against a real slicer-core scene holding the real MNI
volume and the built-in engine behind a real uvicorn server on a loopback port: the paths that succeed."""

from __future__ import annotations

import numpy as np
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib.capture import capture_slice
from MiniGPTMedSlicerLib.client import BackendClient
from MiniGPTMedSlicerLib.geometry import box_to_plane_roi
from MiniGPTMedSlicerQt.qt_compat import qt
from panel_helpers import idle, make_panel, run_and_wait, select_task

pytest_plugins = ["panel_fixtures"]  # the mrml and panel fixtures


def test_test_connection_shows_engine_model_and_tasks(qtbot, panel, builtin_server):
    health = BackendClient(builtin_server).health()
    qtbot.mouseClick(panel.test_button, qt.Qt.LeftButton)
    assert not panel.test_button.isEnabled()  # the request runs on a worker thread
    qtbot.waitUntil(lambda: idle(panel), timeout=10000)
    text = panel.connection_label.text()
    assert health.engine in text and health.model in text, text
    assert all(t in text for t in health.tasks), text


def test_task_combo_lists_the_protocol_tasks_then_the_sweep(panel):
    items = [panel.task_combo.itemText(i) for i in range(panel.task_combo.count())]
    assert items == ["Report", "Ask", "Detect", "Locate", "Identify region", "Sweep volume"]
    select_task(panel, "Ask")
    assert panel.question_edit.isEnabled() and panel.question_edit.placeholderText() == "the question"
    assert not panel.region_combo.isEnabled() and not panel.range_edit.isEnabled()
    select_task(panel, "Report")
    assert not panel.question_edit.isEnabled()
    select_task(panel, "Identify region")
    assert panel.region_combo.isEnabled() and not panel.question_edit.isEnabled()
    select_task(panel, "Sweep volume")
    assert panel.range_edit.isEnabled() and panel.question_edit.placeholderText() == "kind of finding (optional)"


def test_detect_fills_table_and_scene_and_row_click_jumps(qtbot, panel, mrml):
    select_task(panel, "Detect")
    panel.view_combo.setCurrentIndex(panel.view_combo.findText("Red"))
    mrml.slice_logics["Red"].SetSliceOffset(10.0)
    qtbot.mouseClick(panel.analyze_button, qt.Qt.LeftButton)
    assert panel.cancel_button.isEnabled() and not panel.analyze_button.isEnabled()
    qtbot.waitUntil(lambda: idle(panel), timeout=20000)
    rows = M.finding_rows(mrml.scene)
    assert len(rows) > 0, panel.status_label.text()
    assert panel.table.rowCount() == len(rows)
    rois = mrml.scene.GetNodesByClass("vtkMRMLMarkupsROINode")
    assert rois.GetNumberOfItems() == len(rows)
    assert "not a diagnosis" in panel.text_edit.toPlainText()
    assert "finding(s) from builtin" in panel.status_label.text()
    assert panel.table.item(0, 2).text() == "Red" and panel.table.item(0, 3).text() == "10.0"
    assert "×" in panel.table.item(0, 1).text() and float(panel.table.item(0, 4).text()) > 0
    # click the last row: the Yellow (sagittal) and Green (coronal) views move onto that finding, the markup is selected
    r = panel.table.rowCount() - 1
    node_id = panel.table.item(r, 0).data(qt.Qt.UserRole)
    roi = mrml.scene.GetNodeByID(node_id)
    assert not roi.GetSelected()
    rect = panel.table.visualItemRect(panel.table.item(r, 0))
    qtbot.mouseClick(panel.table.viewport(), qt.Qt.LeftButton, pos=rect.center())
    c = M.roi_center(roi)
    assert roi.GetSelected()
    yellow = mrml.slice_logics["Yellow"].GetSliceNode().GetSliceToRAS()
    green = mrml.slice_logics["Green"].GetSliceNode().GetSliceToRAS()
    assert abs(yellow.GetElement(0, 3) - c[0]) < 1e-3  # the sagittal plane passes through the finding (R)
    assert abs(green.GetElement(1, 3) - c[1]) < 1e-3  # the coronal plane too (A)


def test_keep_earlier_results_and_clear(qtbot, panel, mrml):
    before = mrml.scene.GetNumberOfNodes()
    select_task(panel, "Detect")
    assert panel.keep_check.isChecked()
    run_and_wait(qtbot, panel)
    run_and_wait(qtbot, panel)
    assert len(M.list_results(mrml.scene)) == 2  # kept
    panel.keep_check.setChecked(False)
    run_and_wait(qtbot, panel)
    assert len(M.list_results(mrml.scene)) == 1  # replaced
    assert panel.table.rowCount() == len(M.finding_rows(mrml.scene)) > 0
    qtbot.mouseClick(panel.clear_button, qt.Qt.LeftButton)
    assert panel.table.rowCount() == 0 and M.list_results(mrml.scene) == []
    assert panel.text_edit.toPlainText() == "" and "Removed 1" in panel.status_label.text()
    assert mrml.scene.GetNodesByClass("vtkMRMLMarkupsROINode").GetNumberOfItems() == 0
    assert mrml.scene.GetNumberOfNodes() == before


def test_identify_region_uses_a_drawn_roi(qtbot, panel, mrml):
    red = mrml.slice_logics["Red"]
    red.SetSliceOffset(10.0)
    select_task(panel, "Identify region")
    assert panel.region_combo.count() == 0  # nothing drawn yet
    cap = capture_slice(red)
    centre, size, axes = box_to_plane_roi(cap.pixel_to_ras, [100, 100, 140, 130], 4.0)
    roi = M.add_roi(mrml.scene, "my region", centre, size, axes, (1, 1, 0), {}, "my region")
    for key in list(roi.GetAttributeNames() or []):  # a plain user-drawn ROI, not one of ours
        roi.RemoveAttribute(key)
    try:
        assert panel.region_combo.isEnabled()
        run_and_wait(qtbot, panel)  # the ROI drawn after the task was picked is found when Analyze is clicked
        i = panel.region_combo.findData(roi.GetID())
        assert i >= 0 and panel.region_combo.itemText(i) == "my region"
        assert panel.region_combo.currentIndex() == i
        rows = M.finding_rows(mrml.scene)
        assert len(rows) == 1 and "region" in rows[0].label, panel.status_label.text()
        got = mrml.scene.GetNodeByID(rows[0].node_id)
        assert np.allclose(M.roi_center(got), centre, atol=0.05)  # the answer sits on the drawn region
    finally:
        M.remove_node(mrml.scene, roi)


def test_sweep_from_the_panel(qtbot, panel, mrml):
    select_task(panel, "Sweep volume")
    assert panel.range_edit.isEnabled()
    panel.view_combo.setCurrentIndex(panel.view_combo.findText("Red"))
    panel.range_edit.setText("80:110:3")
    status = run_and_wait(qtbot, panel, 60000)
    assert "over 10 slices" in status, status
    assert M.list_results(mrml.scene) and "over 10 Red slices" in panel.text_edit.toPlainText()


def test_settings_are_stored_as_strings_and_read_back(qtbot, mrml, tmp_path):
    path = str(tmp_path / "s.ini")
    p = make_panel(qtbot, mrml, "http://127.0.0.1:9", settings=qt.QSettings(path, qt.QSettings.IniFormat))
    p.token_edit.setText("tok")
    p._configure()
    p.settings.sync()
    text = open(path).read()
    assert "backendUrl=http://127.0.0.1:9" in text and "accessToken=tok" in text
    p2 = make_panel(qtbot, mrml, settings=qt.QSettings(path, qt.QSettings.IniFormat))  # a fresh panel reads them
    assert p2.url_edit.text() == "http://127.0.0.1:9" and p2.token_edit.text() == "tok"
