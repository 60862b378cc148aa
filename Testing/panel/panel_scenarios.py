"""The panel's scenarios, written once: they run under pytest-qt/PySide6 (test_panel_*.py) and as a script
inside the PythonQt host for Slicer 5.8 and 5.10 (host_panel_scenarios.py, run by test_panel_pythonqt.py).

Each scenario is a plain function ``f(env)``: it drives the real panel through ``env.ui`` (Qt's own clicks and mouse
events, waits that run the event loop), checks with plain ``assert`` (rewritten by pytest, reported as text by the
host script), and may return a dict of measurements. Widgets are read only through ``qt_compat.prop`` and getters
that PythonQt does not shadow (``isEnabled()``, ``toPlainText()``, ``item().data()``), so the same lines hold in both.
The backends are real servers on loopback ports, run by the caller (pytest's process), never inside the host: a
uvicorn thread there would compete for the GIL that Slicer's main thread keeps.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib.capture import capture_slice, to_request
from MiniGPTMedSlicerLib.client import BackendClient, Timeouts
from MiniGPTMedSlicerLib.geometry import box_to_plane_roi
from MiniGPTMedSlicerLib.logic import AnalysisLogic
from MiniGPTMedSlicerQt.panel import Panel
from MiniGPTMedSlicerQt.qt_compat import is_gui_thread, prop, qt

SLOW_DELAY_S = 1.5  # the slow engine's default delay (the responsiveness scenario)
TOKEN_STEP_S = 0.02  # the decoding stand-in's time per word (50 words: a 1 s streamed answer)
TICK_MS = 20
TOKEN = "s3cret-token"  # the access token of the "token" backend
EDIT_SHIFT = np.array([4.0, -2.0, 0.0])  # the review scenario moves an ROI by this (RAS mm)


class Ui:
    """Drives Qt without QTest (PythonQt has none): ``QAbstractButton.click()`` emits the real ``clicked``; a table
    cell gets a real mouse press and release; waits run a nested event loop, so timers fire as in ``app.exec()``
    (inside the host the main thread keeps the GIL there, as Slicer's does)."""

    def click(self, button) -> None:
        button.click()

    def click_cell(self, table, row: int, column: int = 0) -> None:
        pos = qt.QPointF(table.visualItemRect(table.item(row, column)).center())
        for kind in (qt.QEvent.MouseButtonPress, qt.QEvent.MouseButtonRelease):
            event = qt.QMouseEvent(kind, pos, qt.Qt.LeftButton, qt.Qt.LeftButton, qt.Qt.NoModifier)
            qt.QApplication.sendEvent(table.viewport(), event)

    def key(self, widget, key: str) -> None:
        """A key press and release on ``widget`` (``key``: a Qt key name without ``Key_``, e.g. ``"A"``)."""
        code = getattr(qt.Qt, "Key_" + key)
        for kind in (qt.QEvent.KeyPress, qt.QEvent.KeyRelease):
            qt.QApplication.sendEvent(widget, qt.QKeyEvent(kind, code, qt.Qt.NoModifier, key.lower()))

    def enter(self, widget) -> None:
        """Return pressed and released on ``widget`` (a line edit sends returnPressed)."""
        for kind in (qt.QEvent.KeyPress, qt.QEvent.KeyRelease):
            qt.QApplication.sendEvent(widget, qt.QKeyEvent(kind, qt.Qt.Key_Return, qt.Qt.NoModifier, "\r"))

    def wait(self, ms: int) -> None:
        loop = qt.QEventLoop()
        qt.QTimer.singleShot(int(ms), loop.quit)
        loop.exec()

    def wait_until(self, cond: Callable[[], Any], timeout_ms: int = 20000) -> None:
        t_end = time.monotonic() + timeout_ms / 1000
        while not cond():
            if time.monotonic() > t_end:
                raise TimeoutError(f"waited {timeout_ms} ms for {getattr(cond, '__name__', cond)}")
            self.wait(10)


@dataclass
class Env:
    mrml: Any  # MiniGPTMedSlicerLib.scene.SceneContext with Red/Yellow/Green views of the test CT volume
    ui: Ui
    urls: dict[str, str]  # builtin, slow, not_backend (404 for everything), token, minigpt, tokens, closed
    tmp_dir: str
    register: Callable[[Any], None] = lambda widget: None  # pytest-qt: qtbot.addWidget
    slow_started: Callable[[], int] | None = None  # requests the slow engine has begun (None: not visible here)
    panels: list[Panel] = field(default_factory=list)
    runner: Callable[[], Any] | None = None  # makes the panel's runner (None: the panel's own, Qt's event loop)
    dicom_dir: str | None = None  # a small CT series from the chest CT (the SR export needs a DICOM source)

    def panel(self, url: str | None = "builtin", settings=None, timeouts: Timeouts | None = None) -> Panel:
        """A fresh real panel on the shared scene, its results cleared; ``url``: a key of ``urls`` or a URL."""
        M.clear_results(self.mrml.scene)
        mrml = self.mrml
        logic = AnalysisLogic(mrml.scene, lambda: dict(mrml.slice_logics), timeouts=timeouts)
        p = Panel(logic, settings=settings, runner=self.runner() if self.runner else None)
        self.register(p.widget)
        p.widget.show()
        if url is not None:
            p.url_edit.setText(self.urls.get(url, url))
        self.panels.append(p)
        return p

    def close(self) -> None:
        for p in self.panels:
            p.cleanup()
        self.panels.clear()
        M.clear_results(self.mrml.scene)


# -- reading the panel ---------------------------------------------------------------------------


def text(w) -> str:
    return str(prop(w, "text"))


def rows(p: Panel) -> int:
    return int(prop(p.table, "rowCount"))


def cell(p: Panel, r: int, c: int) -> str:
    return str(p.table.item(r, c).text())  # a QTableWidgetItem is no QObject: nothing shadows text()


def idle(p: Panel) -> bool:
    return p.job is None and p.analyze_button.isEnabled() and not p.cancel_button.isEnabled()


def select_task(p: Panel, name: str) -> None:
    i = p.task_combo.findText(name)
    assert i >= 0, name
    p.task_combo.setCurrentIndex(i)


def select_view(p: Panel, name: str) -> None:
    p.view_combo.setCurrentIndex(p.view_combo.findText(name))


def run_and_wait(env: Env, p: Panel, timeout_ms: int = 20000) -> str:
    """Click Analyze, wait until the panel is idle again, return the status line."""
    env.ui.click(p.analyze_button)
    env.ui.wait_until(lambda: idle(p), timeout_ms)
    return text(p.status_label)


class SceneUnchanged:
    def __init__(self, scene):
        self.scene = scene

    def __enter__(self):
        self.before = (self.scene.GetNumberOfNodes(), len(M.list_results(self.scene)))
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            after = (self.scene.GetNumberOfNodes(), len(M.list_results(self.scene)))
            assert after == self.before, (after, self.before)


def assert_error_shown(p: Panel, *needles: str) -> None:
    status = text(p.status_label)
    assert status.startswith("Error: "), status
    for n in needles:
        assert n in status, (n, status)
    assert "c62828" in str(prop(p.status_label, "styleSheet"))  # shown in red
    assert idle(p)


class Heartbeat:
    """A QTimer on the GUI thread recording when it fired: gaps show when the event loop was blocked."""

    def __init__(self, parent, interval_ms: int = TICK_MS):
        self.ticks: list[float] = []
        self.timer = qt.QTimer(parent)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(lambda: self.ticks.append(time.monotonic()))

    def start(self) -> None:
        self.ticks.clear()
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def between(self, t0: float, t1: float) -> list[float]:
        return [t for t in self.ticks if t0 <= t <= t1]

    def largest_gap(self, t0: float, t1: float) -> float:
        ts = [t0, *self.between(t0, t1), t1]
        return max(b - a for a, b in itertools.pairwise(ts))


# -- the scenarios -------------------------------------------------------------------------------


def connection(env: Env) -> dict:
    """Test connection shows the engine, the model and the tasks the server reports."""
    health = BackendClient(env.urls["builtin"]).health()
    p = env.panel()
    t0 = time.monotonic()
    env.ui.click(p.test_button)
    assert not p.test_button.isEnabled()  # the request runs off the GUI thread
    env.ui.wait_until(lambda: idle(p), 10000)
    elapsed = time.monotonic() - t0
    label = text(p.connection_label)
    assert health.engine in label and health.model in label, label
    assert all(t in label for t in health.tasks), label
    return {"health_s": elapsed}


def task_combo(env: Env) -> None:
    """The task combo lists the protocol's tasks, then the sweep; each task enables the inputs it uses."""
    p = env.panel()
    combo = p.task_combo
    items = [combo.itemText(i) for i in range(int(prop(combo, "count")))]
    assert items == ["Report", "Ask", "Detect", "Locate", "Identify region", "Sweep volume"], items
    select_task(p, "Ask")
    assert p.question_edit.isEnabled() and text_prop(p.question_edit, "placeholderText") == "the question"
    assert not p.region_combo.isEnabled() and not p.range_edit.isEnabled()
    select_task(p, "Report")
    assert not p.question_edit.isEnabled()
    select_task(p, "Identify region")
    assert p.region_combo.isEnabled() and not p.question_edit.isEnabled()
    select_task(p, "Sweep volume")
    assert p.range_edit.isEnabled()
    assert text_prop(p.question_edit, "placeholderText") == "kind of finding (optional)"


def text_prop(w, name: str) -> str:
    return str(prop(w, name))


def detect_table_rois_and_row_click(env: Env) -> dict:
    """Detect fills the table and the scene (one ROI per row); a row click moves the other views onto the finding."""
    p = env.panel()
    mrml = env.mrml
    select_task(p, "Detect")
    select_view(p, "Red")
    mrml.slice_logics["Red"].SetSliceOffset(10.0)
    t0 = time.monotonic()
    env.ui.click(p.analyze_button)
    assert p.cancel_button.isEnabled() and not p.analyze_button.isEnabled()
    env.ui.wait_until(lambda: idle(p), 20000)
    elapsed = time.monotonic() - t0
    found = M.finding_rows(mrml.scene)
    assert len(found) > 0, text(p.status_label)
    assert rows(p) == len(found)
    assert mrml.scene.GetNodesByClass("vtkMRMLMarkupsROINode").GetNumberOfItems() == len(found)
    assert "not a diagnosis" in p.text_edit.toPlainText()
    assert "finding(s) from builtin" in text(p.status_label)
    assert cell(p, 0, 2) == "Red" and cell(p, 0, 3) == "10.0"
    assert "×" in cell(p, 0, 1) and float(cell(p, 0, 4)) > 0
    # click the last row: the Yellow (sagittal) and Green (coronal) views move onto that finding, the markup is selected
    r = rows(p) - 1
    node_id = p.table.item(r, 0).data(qt.Qt.UserRole)
    assert isinstance(node_id, str), node_id
    roi = mrml.scene.GetNodeByID(node_id)
    assert not roi.GetSelected()
    env.ui.click_cell(p.table, r, 0)
    c = M.roi_center(roi)
    assert roi.GetSelected()
    yellow = mrml.slice_logics["Yellow"].GetSliceNode().GetSliceToRAS()
    green = mrml.slice_logics["Green"].GetSliceNode().GetSliceToRAS()
    assert abs(yellow.GetElement(0, 3) - c[0]) < 1e-3  # the sagittal plane passes through the finding (R)
    assert abs(green.GetElement(1, 3) - c[1]) < 1e-3  # the coronal plane too (A)
    return {"detect_s": elapsed}


def keep_replace_and_clear(env: Env) -> None:
    p = env.panel()
    mrml = env.mrml
    before = mrml.scene.GetNumberOfNodes()
    select_task(p, "Detect")
    assert p.keep_check.isChecked()
    run_and_wait(env, p)
    run_and_wait(env, p)
    assert len(M.list_results(mrml.scene)) == 2  # kept
    p.keep_check.setChecked(False)
    run_and_wait(env, p)
    assert len(M.list_results(mrml.scene)) == 1  # replaced
    assert rows(p) == len(M.finding_rows(mrml.scene)) > 0
    env.ui.click(p.clear_button)
    assert rows(p) == 0 and M.list_results(mrml.scene) == []
    assert p.text_edit.toPlainText() == "" and "Removed 1" in text(p.status_label)
    assert mrml.scene.GetNodesByClass("vtkMRMLMarkupsROINode").GetNumberOfItems() == 0
    assert mrml.scene.GetNumberOfNodes() == before


def identify_with_a_drawn_roi(env: Env) -> None:
    p = env.panel()
    mrml = env.mrml
    red = mrml.slice_logics["Red"]
    red.SetSliceOffset(10.0)
    select_task(p, "Identify region")
    assert int(prop(p.region_combo, "count")) == 0  # nothing drawn yet
    cap = capture_slice(red)
    centre, size, axes = box_to_plane_roi(cap.pixel_to_ras, [100, 100, 140, 130], 4.0)
    roi = M.add_roi(mrml.scene, "my region", centre, size, axes, (1, 1, 0), {}, "my region")
    for key in list(roi.GetAttributeNames() or []):  # a plain user-drawn ROI, not one of ours
        roi.RemoveAttribute(key)
    try:
        assert p.region_combo.isEnabled()
        run_and_wait(env, p)  # the ROI drawn after the task was picked is found when Analyze is clicked
        i = p.region_combo.findData(roi.GetID())
        assert i >= 0 and p.region_combo.itemText(i) == "my region"
        assert int(prop(p.region_combo, "currentIndex")) == i
        found = M.finding_rows(mrml.scene)
        assert len(found) == 1 and "region" in found[0].label, text(p.status_label)
        got = mrml.scene.GetNodeByID(found[0].node_id)
        assert np.allclose(M.roi_center(got), centre, atol=0.05)  # the answer sits on the drawn region
    finally:
        M.remove_node(mrml.scene, roi)


def sweep(env: Env) -> dict:
    p = env.panel()
    select_task(p, "Sweep volume")
    assert p.range_edit.isEnabled()
    select_view(p, "Red")
    p.range_edit.setText("20:50:3")
    t0 = time.monotonic()
    status = run_and_wait(env, p, 60000)
    elapsed = time.monotonic() - t0
    assert "over 10 slices" in status, status
    assert M.list_results(env.mrml.scene) and "over 10 Red slices" in p.text_edit.toPlainText()
    return {"sweep10_s": elapsed}


def settings_round_trip(env: Env) -> None:
    """Settings are stored as strings and a fresh panel reads them back."""
    path = os.path.join(env.tmp_dir, "settings.ini")
    p = env.panel("http://127.0.0.1:9", settings=qt.QSettings(path, qt.QSettings.IniFormat))
    p.token_edit.setText("tok")
    p._configure()
    p.settings.sync()
    with open(path) as f:
        stored = f.read()
    assert "backendUrl=http://127.0.0.1:9" in stored and "accessToken=tok" in stored, stored
    p2 = env.panel(None, settings=qt.QSettings(path, qt.QSettings.IniFormat))
    assert text(p2.url_edit) == "http://127.0.0.1:9" and text(p2.token_edit) == "tok"


def backend_down(env: Env) -> None:
    p = env.panel("closed")
    select_task(p, "Report")
    with SceneUnchanged(env.mrml.scene):
        run_and_wait(env, p)
    assert_error_shown(p, "Cannot reach the backend", "Is it running?", "minigptmed-backend serve")
    assert rows(p) == 0 and p.text_edit.toPlainText() == ""
    env.ui.click(p.test_button)
    env.ui.wait_until(lambda: idle(p), 20000)
    assert text(p.connection_label) == "Not connected"
    assert_error_shown(p, "Is it running?")


def wrong_url(env: Env) -> None:
    p = env.panel("not_backend")  # a web server, but not ours
    select_task(p, "Detect")
    with SceneUnchanged(env.mrml.scene):
        run_and_wait(env, p)
    assert_error_shown(p, "was not found", "Is http://127.0.0.1:", "the address of a MiniGPTMedSlicer backend?")
    p.url_edit.setText("127.0.0.1:8765")  # no scheme
    with SceneUnchanged(env.mrml.scene):
        run_and_wait(env, p)
    assert_error_shown(p, "must start with http:// or https://")


def server_4xx_and_panel_checks(env: Env) -> None:
    p = env.panel()
    with SceneUnchanged(env.mrml.scene):
        select_task(p, "Ask")
        p.question_edit.setText("Is there a haemorrhage?")
        run_and_wait(env, p)
        # the builtin engine cannot answer questions: the server's 501 message names the engines that can
        assert_error_shown(p, "--engine minigptmed", "501")
        # checked in the panel before anything is sent
        p.question_edit.setText("")
        env.ui.click(p.analyze_button)
        assert_error_shown(p, "Type a question")
        select_task(p, "Locate")
        env.ui.click(p.analyze_button)
        assert_error_shown(p, "phrase to locate")
        select_task(p, "Identify region")
        assert int(prop(p.region_combo, "count")) == 0
        env.ui.click(p.analyze_button)
        assert_error_shown(p, "needs an ROI")


def server_400_message(env: Env) -> None:
    """The server's own 400 message (not a check in the panel) reaches the status line."""
    p = env.panel()
    select_task(p, "Detect")
    p.question_edit.setText("mass " * 420)  # 2100 characters: over the server's question limit
    with SceneUnchanged(env.mrml.scene):
        run_and_wait(env, p)
    assert_error_shown(p, "question is 2099 characters; the limit is 2000", "(HTTP 400)")


def read_timeout(env: Env) -> None:
    p = env.panel("slow", timeouts=Timeouts(connect_s=2.0, health_s=2.0, analyze_s=0.5))
    select_task(p, "Report")  # the slow engine takes SLOW_DELAY_S > 0.5 s
    with SceneUnchanged(env.mrml.scene):
        run_and_wait(env, p, 10000)
    assert_error_shown(p, "did not answer within 0.5 s")


def access_token(env: Env) -> None:
    """A backend started with a token: without it the server's 401 message is shown; with it the analysis runs."""
    p = env.panel("token")
    select_task(p, "Detect")
    with SceneUnchanged(env.mrml.scene):
        run_and_wait(env, p)
    assert_error_shown(p, "Not authorised (401)")
    p.token_edit.setText(TOKEN)
    status = run_and_wait(env, p)
    assert "finding(s) from builtin" in status, status
    assert len(M.list_results(env.mrml.scene)) == 1


def responsive_during_a_slow_analysis(env: Env) -> dict:
    """A heartbeat QTimer keeps ticking while a slow request is in flight; the answer is applied when it comes."""
    p = env.panel("slow")
    select_task(p, "Report")
    beat = Heartbeat(p.widget)
    beat.start()
    t0 = time.monotonic()
    env.ui.click(p.analyze_button)
    assert time.monotonic() - t0 < 0.5  # the click handler returned while the request is in flight
    assert p.job is not None and not p.analyze_button.isEnabled() and p.cancel_button.isEnabled()
    assert int(prop(p.progress, "maximum")) == 0  # busy indicator
    env.ui.wait_until(lambda: idle(p), 15000)
    t1 = time.monotonic()
    beat.stop()
    assert t1 - t0 >= SLOW_DELAY_S, "the slow engine was not slow"
    window = beat.between(t0, t0 + SLOW_DELAY_S)
    gap = beat.largest_gap(t0, t1)
    # a third of the ticks a free core would give: timers fire late on a loaded machine; the gap is the sharp check
    assert len(window) >= SLOW_DELAY_S * 1000 / TICK_MS / 3, len(window)
    assert gap < 0.25, gap
    assert f"slept {SLOW_DELAY_S:.2f}s" in p.text_edit.toPlainText(), text(p.status_label)
    assert len(M.list_results(env.mrml.scene)) == 1
    return {"largest_gap_s": gap, "ticks": len(window), "elapsed_s": t1 - t0}


def negative_control_blocking_call(env: Env) -> dict:
    """The same heartbeat sees a gap when the same request is made on the GUI thread (what the panel must not do)."""
    p = env.panel("slow")
    beat = Heartbeat(p.widget)
    beat.start()
    env.ui.wait(100)
    t0 = time.monotonic()
    BackendClient(env.urls["slow"]).analyze(to_request(capture_slice(env.mrml.slice_logics["Red"]), "report"))
    env.ui.wait(100)
    t1 = time.monotonic()
    beat.stop()
    gap = beat.largest_gap(t0, t1)
    assert gap >= SLOW_DELAY_S * 0.9, gap
    return {"largest_gap_s": gap}


def cancel_during_a_slow_request(env: Env) -> None:
    mrml = env.mrml
    p = env.panel("slow")
    before = mrml.scene.GetNumberOfNodes()
    select_task(p, "Detect")
    started = env.slow_started() if env.slow_started else 0
    env.ui.click(p.analyze_button)
    if env.slow_started is not None:
        slow_started = env.slow_started
        env.ui.wait_until(lambda: slow_started() > started, 5000)  # the request reached the engine
    else:
        env.ui.wait(500)  # the caller checks afterwards that the request reached the engine
    assert p.job is not None and not p.analyze_button.isEnabled()
    job = p.job
    env.ui.click(p.cancel_button)
    assert idle(p) and "Cancelled" in text(p.status_label)
    assert int(prop(p.progress, "maximum")) == 100 and int(prop(p.progress, "value")) == 0
    env.ui.wait_until(job.done.is_set, 10000)  # the late answer arrives on the worker ...
    env.ui.wait(200)  # ... and the (stopped) poll timer never applies it
    assert not p.timer.isActive()
    assert mrml.scene.GetNumberOfNodes() == before and M.list_results(mrml.scene) == []
    assert rows(p) == 0 and p.text_edit.toPlainText() == ""


def status_cell(p: Panel, r: int) -> str:
    return cell(p, r, 5)


def visible_rows(p: Panel) -> list[int]:
    return [r for r in range(rows(p)) if not p.table.isRowHidden(r)]


def node_of(env: Env, p: Panel, r: int):
    return env.mrml.scene.GetNodeByID(p.table.item(r, 0).data(qt.Qt.UserRole))


def selected(p: Panel) -> list[int]:
    return sorted({item.row() for item in p.table.selectedItems()})


def three_analyses(env: Env, p: Panel) -> None:
    """Detect on three axial slices of the phantom (every one cuts a nodule), results kept: three rows or more."""
    select_task(p, "Detect")
    select_view(p, "Red")
    for offset in (0.0, 10.0, 20.0):
        env.mrml.slice_logics["Red"].SetSliceOffset(offset)
        status = run_and_wait(env, p)
        assert "finding(s) from builtin" in status, status
    assert rows(p) >= 3, rows(p)


def review_buttons_and_keys(env: Env) -> None:
    """Accept / Reject buttons and the A / R / N / P / E keys on the table set the findings' node attributes; a
    rejected finding's ROI and row are hidden (Show rejected brings the row back); Edit unlocks the ROI, the row
    follows its size while it moves and says "edited" when done; Accept all / Reject all; Clear."""
    from MiniGPTMedSlicerLib import review as R

    p = env.panel()
    three_analyses(env, p)
    n = rows(p)
    assert [status_cell(p, r) for r in range(n)] == ["pending"] * n
    env.ui.click_cell(p.table, 0, 0)
    env.ui.click(p.accept_button)
    first = node_of(env, p, 0)
    assert first.GetAttribute(R.STATUS_ATTR) == "accepted" and first.GetAttribute(R.TIME_ATTR)
    assert status_cell(p, 0) == "accepted" and selected(p) == [1]  # on to the next finding
    env.ui.key(p.table, "R")
    second = node_of(env, p, 1)
    assert second.GetAttribute(R.STATUS_ATTR) == "rejected" and not second.GetDisplayNode().GetVisibility()
    assert p.table.isRowHidden(1) and second.GetID() in {r.node_id for r in M.finding_rows(env.mrml.scene)}
    assert selected(p) == [2]
    env.ui.key(p.table, "P")  # previous skips the hidden row
    assert selected(p) == [0]
    env.ui.key(p.table, "N")
    assert selected(p) == [2]
    p.show_rejected_check.setChecked(True)
    assert not p.table.isRowHidden(1) and status_cell(p, 1) == "rejected"
    p.show_rejected_check.setChecked(False)
    assert p.table.isRowHidden(1)
    # edit row 2: unlock, move and resize its ROI in code (what dragging its handles does), finish
    third = node_of(env, p, 2)
    c0, s0 = M.roi_center(third), np.array(third.GetSize())
    assert third.GetLocked()
    env.ui.key(p.table, "E")
    assert not third.GetLocked() and third.GetDisplayNode().GetHandlesInteractive()
    assert status_cell(p, 2) == "editing" and p.edit_button.isChecked()
    R.move_roi(third, c0 + EDIT_SHIFT, s0 * [1.5, 0.5, 1.0])
    want = "×".join(f"{v:.1f}" for v in s0 * [1.5, 0.5, 1.0])
    assert cell(p, 2, 1) == want, (cell(p, 2, 1), want)  # the row follows the box while it moves
    env.ui.click(p.edit_button)
    assert third.GetLocked() and not third.GetDisplayNode().GetHandlesInteractive() and not p.edit_button.isChecked()
    assert third.GetAttribute(R.STATUS_ATTR) == "edited" and status_cell(p, 2) == "edited" and cell(p, 2, 1) == want
    orig = R.original_geometry(third)
    assert orig is not None and np.allclose(orig[0], c0, atol=1e-3) and np.allclose(orig[1], s0, atol=1e-3)
    assert np.allclose(M.roi_center(third), c0 + EDIT_SHIFT, atol=1e-3)
    env.ui.click(p.accept_all_button)
    assert {status_cell(p, r) for r in range(n)} == {"accepted"} and visible_rows(p) == list(range(n))
    assert second.GetDisplayNode().GetVisibility()
    env.ui.click(p.reject_all_button)
    assert visible_rows(p) == [] and rows(p) == n
    assert all(not node_of(env, p, r).GetDisplayNode().GetVisibility() for r in range(n))
    assert {R.status(r) for r in R.finding_rois(env.mrml.scene)} == {"rejected"}
    env.ui.click(p.clear_button)
    assert rows(p) == 0 and R.finding_rois(env.mrml.scene) == []


def export_folder(env: Env) -> None:
    """Export writes the accepted findings: a table (CSV + JSON) and one .mrk.json each; on a volume that is not
    DICOM the SR is refused in one line and the rest is written; on a DICOM series the SR references it."""
    import csv

    p = env.panel()
    three_analyses(env, p)
    n = rows(p)
    folder = os.path.join(env.tmp_dir, "export")
    env.ui.click(p.export_button)
    assert_error_shown(p, "Choose a folder")
    p.export_folder_edit.setText(folder)
    env.ui.click(p.export_button)
    assert_error_shown(p, "nothing to export")
    assert not p.add_to_database_check.isEnabled()  # Slicer's DICOM database: only inside the app
    env.ui.click(p.accept_all_button)
    env.ui.click_cell(p.table, 1, 0)
    env.ui.click(p.reject_button)
    env.ui.click(p.export_button)
    assert_error_shown(p, f"Wrote {n + 1} file(s)", "DICOM SR", "needs a DICOM source")  # n-1 markups, CSV, JSON
    kept = [r for r in range(n) if r != 1]
    with open(os.path.join(folder, "findings.csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["status"] for t in table] == ["accepted"] * (n - 1)
    for t, r in zip(table, kept, strict=True):
        c = M.roi_center(node_of(env, p, r))
        assert np.allclose([float(t[k]) for k in ("center_r", "center_a", "center_s")], c, atol=1e-3)
    marks = sorted(os.listdir(os.path.join(folder, "markups")))
    assert len(marks) == n - 1 and all(m.endswith(".mrk.json") for m in marks), marks
    assert not os.path.exists(os.path.join(folder, "findings-sr.dcm"))
    p.export_sr_check.setChecked(False)
    env.ui.click(p.export_button)
    assert text(p.status_label) == f"Wrote {n + 1} file(s) to {folder}.", text(p.status_label)
    if env.dicom_dir is not None:
        export_sr_of_a_dicom_series(env, p, folder)


def export_sr_of_a_dicom_series(env: Env, p: Panel, folder: str) -> None:
    import pydicom
    from MiniGPTMedSlicerLib import dicom_series
    from MiniGPTMedSlicerLib import scene as S

    assert env.dicom_dir is not None
    mrml = env.mrml
    red = mrml.slice_logics["Red"]
    comp = red.GetSliceCompositeNode()
    phantom_id = comp.GetBackgroundVolumeID()
    (series,) = dicom_series.scan(env.dicom_dir)
    vol = S.load_volume(mrml, env.dicom_dir)
    try:
        comp.SetBackgroundVolumeID(vol.GetID())
        red.FitSliceToAll()
        env.ui.click(p.clear_button)
        # what Slicer's DICOM database does for a loaded series: its instances' files
        files = {i.sop_instance_uid: i.path for i in series.instances}
        p.logic.instance_file = files.get
        select_task(p, "Locate")
        select_view(p, "Red")
        p.question_edit.setText("bone")
        status = run_and_wait(env, p)
        assert "finding(s) from builtin" in status and rows(p) > 0, status
        env.ui.click(p.accept_all_button)
        p.export_sr_check.setChecked(True)
        env.ui.click(p.export_button)
        assert text(p.status_label).startswith("Wrote "), text(p.status_label)
        sr = pydicom.dcmread(os.path.join(folder, "findings-sr.dcm"))
        assert sr.Modality == "SR" and sr.StudyInstanceUID == series.study_uid
        ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert ev.SeriesInstanceUID == series.uid
        refs = {x.ReferencedSOPInstanceUID for x in ev.ReferencedSOPSequence}
        assert refs == set(files)
    finally:
        comp.SetBackgroundVolumeID(phantom_id)
        red.FitSliceToAll()
        M.clear_results(mrml.scene)
        M.remove_node(mrml.scene, vol)


def _seen(env: Env) -> list[dict]:
    """What the tiny MiniGPT-Med's engine was given so far (the server's own record: panel_servers.py)."""
    import requests

    r = requests.get(env.urls["minigpt"] + "/test/seen", timeout=10)
    r.raise_for_status()
    return r.json()


def conversation(env: Env) -> dict:
    """Two turns about one CT slice with the tiny MiniGPT-Med: Analyze (Report), then a follow-up typed in the
    question box and sent with Enter. Both turns are in the transcript; on the server the second request had the
    stored image's id and the first turn (with the model's own first answer) as history. The conversation is saved on
    the analysis' text node and comes back from a saved and reopened .mrb; a slice change starts a new
    conversation (its first question goes without history, about the new image)."""
    from MiniGPTMedSlicerLib import scene as S
    from MiniGPTMedSlicerLib.chat import CONVERSATION_ATTR

    mrml = env.mrml
    n0 = len(_seen(env))
    p = env.panel("minigpt")
    select_view(p, "Red")
    mrml.slice_logics["Red"].SetSliceOffset(10.0)
    select_task(p, "Report")
    t0 = time.monotonic()
    status = run_and_wait(env, p, 120000)
    assert "finding(s) from minigptmed" in status, status
    first = p.text_edit.toPlainText()
    assert first and p.conversation_edit.toPlainText() == f"Q: report\nA: {first}"
    p.follow_up_edit.setText("is there a mass?")
    env.ui.enter(p.follow_up_edit)
    assert p.job is not None and p.job.kind == "follow_up", text(p.status_label)
    assert p.conversation_edit.toPlainText().endswith("\n\nQ: is there a mass?\nA: …")  # shown while it runs
    env.ui.wait_until(lambda: idle(p), 120000)
    elapsed = time.monotonic() - t0
    assert "(turn 2)" in text(p.status_label), text(p.status_label)
    second = p.text_edit.toPlainText()
    transcript = p.conversation_edit.toPlainText()
    assert transcript == f"Q: report\nA: {first}\n\nQ: is there a mass?\nA: {second}", transcript
    assert text(p.follow_up_edit) == ""
    # the server's side: the first request came with its image, the second with the stored image and the history
    seen = _seen(env)[n0:]
    assert [(x["task"], x["question"]) for x in seen] == [("report", None), ("vqa", "is there a mass?")], seen
    assert seen[0]["image"] and seen[0]["image_id"] is None and seen[0]["history"] == []
    assert not seen[1]["image"] and seen[1]["image_id"] == p.logic.chat.conversation.image_id, seen[1]
    assert seen[1]["history"] == [["report", "", seen[0]["raw_output"]]], seen[1]
    # one analysis holds both turns, its text node the saved conversation
    (folder,) = M.list_results(mrml.scene)
    node = M.text_node_of(mrml.scene, folder)
    saved = node.GetAttribute(M.ATTR + CONVERSATION_ATTR)
    assert [(t["task"], t["question"], t["text"]) for t in json.loads(saved)] == [
        ("report", "", first),
        ("vqa", "is there a mass?", second),
    ]
    assert node.GetText() == transcript
    # saved as .mrb and opened again: a panel on the reopened scene shows the conversation
    mrb = S.save_mrb(mrml, os.path.join(env.tmp_dir, "conversation.mrb"))
    ctx = S.open_mrb(mrb, os.path.join(env.tmp_dir, "reopened"))
    try:
        p2 = Panel(AnalysisLogic(ctx.scene, lambda: dict(ctx.slice_logics)))
        env.register(p2.widget)
        assert p2.conversation_edit.toPlainText() == transcript
        assert p2.logic.chat is not None and p2.logic.chat.conversation.to_json() == saved
        p2.cleanup()
    finally:
        S.close(ctx)
    # a slice change: a new conversation, whose first question goes about the new image without history
    mrml.slice_logics["Red"].SetSliceOffset(20.0)
    assert p.conversation_edit.toPlainText() == "" and "New conversation" in text(p.status_label)
    p.follow_up_edit.setText("is there a mass?")
    env.ui.enter(p.follow_up_edit)
    env.ui.wait_until(lambda: idle(p), 120000)
    assert p.conversation_edit.toPlainText() == f"Q: is there a mass?\nA: {p.text_edit.toPlainText()}"
    (third,) = _seen(env)[n0 + 2 :]
    assert third["history"] == [] and not third["image"], third
    assert third["image_id"] == p.logic.chat.conversation.image_id != seen[1]["image_id"], third  # another image
    assert len(M.list_results(mrml.scene)) == 2  # kept: a new analysis
    return {"two_turns_s": elapsed}


def ask_needs_a_vlm_engine(env: Env) -> None:
    """The question box sends Ask: with the built-in engine (its health answer lists no vqa) Test connection disables
    it with a one-line hint in its placeholder and tooltip, and Enter sends nothing; another URL makes it usable again
    until that engine is asked; the tiny MiniGPT-Med (it lists vqa) leaves it as the .ui has it."""
    from MiniGPTMedSlicerLib.protocol import VQA

    assert VQA.id not in BackendClient(env.urls["builtin"]).health().tasks  # the premise, from the server itself
    p = env.panel("builtin")
    box = p.follow_up_edit
    placeholder, tooltip = text_prop(box, "placeholderText"), text_prop(box, "toolTip")
    assert box.isEnabled() and placeholder.startswith("Ask about this image")  # not known before the test
    env.ui.click(p.test_button)
    env.ui.wait_until(lambda: idle(p), 10000)
    assert not box.isEnabled(), text(p.connection_label)
    hint = text_prop(box, "placeholderText")
    assert hint.startswith("This engine answers no free questions") and "\n" not in hint, hint
    assert text_prop(box, "toolTip") == hint
    box.setText("is there a mass?")
    env.ui.enter(box)
    assert p.job is None and idle(p) and p.logic.chat is None  # nothing was sent
    p.url_edit.setText(env.urls["minigpt"])  # another backend: not known again
    assert box.isEnabled() and text_prop(box, "placeholderText") == placeholder
    env.ui.click(p.test_button)
    env.ui.wait_until(lambda: idle(p), 10000)
    assert VQA.id in text(p.connection_label) and "minigpt" in text(p.connection_label), text(p.connection_label)
    assert box.isEnabled() and text_prop(box, "placeholderText") == placeholder
    assert text_prop(box, "toolTip") == tooltip


def streamed_answer_and_cancel(env: Env) -> dict:
    """The answer grows in the findings box as the backend writes it (a decoding stand-in: 50 words, one per step);
    Cancel during a streamed answer names the request in ``DELETE /v1/requests/{id}`` (counted on the server) and the
    engine stops decoding (its step count stands still, short of the 50 words); the panel is idle at once, the box is
    as before, the scene unchanged."""
    import requests

    def stats() -> dict:
        r = requests.get(env.urls["tokens"] + "/test/cancels", timeout=10)
        r.raise_for_status()
        return r.json()

    mrml = env.mrml
    p = env.panel("tokens")
    select_task(p, "Report")
    seen: list[str] = []
    sampler = qt.QTimer(p.widget)
    sampler.setInterval(TICK_MS)
    sampler.timeout.connect(lambda: seen.append(p.text_edit.toPlainText()) if p.job is not None else None)
    sampler.start()
    status = run_and_wait(env, p, 30000)
    sampler.stop()
    final = "".join(f"tok{i} " for i in range(50))  # what the stand-in writes, word by word
    assert p.text_edit.toPlainText() == final, (status, p.text_edit.toPlainText())
    partial = sorted({s for s in seen if s and s != final}, key=len)
    assert len(partial) >= 2 and all(final.startswith(s.rstrip(" …")) for s in partial), partial
    before, nodes, analyses = stats(), mrml.scene.GetNumberOfNodes(), len(M.list_results(mrml.scene))
    env.ui.click(p.analyze_button)
    job = p.job
    env.ui.wait_until(lambda: "tok3" in job.streamed, 10000)  # streaming: its id came with the headers
    assert p.text_edit.toPlainText() == job.streamed
    t0 = time.monotonic()
    env.ui.click(p.cancel_button)
    assert idle(p) and "Cancelled" in text(p.status_label)
    assert p.text_edit.toPlainText() == final  # the box as it was before
    env.ui.wait_until(lambda: stats()["deleted"] > before["deleted"], 10000)
    stopped = stats()["steps"]
    env.ui.wait(10 * int(TOKEN_STEP_S * 1000))  # ten decode steps later the engine has not gone on
    after = stats()
    assert after["deleted"] == before["deleted"] + 1, (before, after)  # by DELETE, not by the connection closing
    assert after["steps"] == stopped and stopped - before["steps"] < 50, (before, after)
    assert mrml.scene.GetNumberOfNodes() == nodes and len(M.list_results(mrml.scene)) == analyses
    return {"cancelled_after_steps": stopped - before["steps"], "cancel_to_delete_answered_s": time.monotonic() - t0}


def a_streamed_answer_outlasts_the_read_timeout(env: Env) -> dict:
    """The read timeout counts from the last bytes a streamed answer brought, as requests' read timeout does, not
    from the request: a 1 s answer whose words come every 20 ms completes under a 0.5 s read timeout (before, the
    panel aborted it at 0.5 s with "did not answer within 0.5 s" while its words were still coming in)."""
    p = env.panel("tokens", timeouts=Timeouts(connect_s=2.0, health_s=2.0, analyze_s=0.5))
    select_task(p, "Report")
    t0 = time.monotonic()
    status = run_and_wait(env, p, 30000)
    elapsed = time.monotonic() - t0
    assert elapsed > 0.5, elapsed  # the stream did outlast the read timeout
    assert not status.startswith("Error"), status
    assert p.text_edit.toPlainText() == "".join(f"tok{i} " for i in range(50)), status
    return {"streamed_s": elapsed}


def _token_stats(env: Env) -> dict:
    """The decoding stand-in's counts (panel_servers.token_server): DELETEs that cancelled a request, decode steps."""
    import requests

    r = requests.get(env.urls["tokens"] + "/test/cancels", timeout=10)
    r.raise_for_status()
    return r.json()


def _report_then_streaming_follow_up(env: Env, p: Panel):
    """Report with the decoding stand-in (the first turn of a conversation), then a follow-up typed in the question
    box; returns its job once its answer is streaming (its request id came with the headers)."""
    select_task(p, "Report")
    status = run_and_wait(env, p, 30000)
    assert "finding(s) from tokens" in status, status
    p.follow_up_edit.setText("is there a mass?")
    env.ui.enter(p.follow_up_edit)
    job = p.job
    assert job is not None and job.kind == "follow_up", text(p.status_label)
    env.ui.wait_until(lambda: "tok3" in job.streamed, 10000)
    return job


def new_conversation_cancels_a_streamed_follow_up(env: Env) -> dict:
    """New conversation while a follow-up's answer is streaming in cancels it as Cancel does (``DELETE
    /v1/requests/{id}``, counted on the server; the engine stops decoding): the panel is idle at once, the transcript
    stays empty and the findings box as it was while the late pieces and the end of the abandoned stream would have
    come, and the scene gets nothing of that turn (its analysis and saved conversation as after the first turn)."""
    from MiniGPTMedSlicerLib.chat import CONVERSATION_ATTR

    mrml = env.mrml
    p = env.panel("tokens")
    before = _token_stats(env)
    job = _report_then_streaming_follow_up(env, p)
    (folder,) = M.list_results(mrml.scene)
    node = M.text_node_of(mrml.scene, folder)
    saved, saved_text = node.GetAttribute(M.ATTR + CONVERSATION_ATTR), node.GetText()
    first = "".join(f"tok{i} " for i in range(50))
    assert len(json.loads(saved)) == 1 and saved_text == first, saved_text
    nodes = mrml.scene.GetNumberOfNodes()
    assert "tok3" in p.conversation_edit.toPlainText()  # the answer streams into the transcript
    env.ui.click(p.new_conversation_button)
    assert idle(p) and job.cancelled and p.logic.chat is None, text(p.status_label)
    assert p.conversation_edit.toPlainText() == "" and "New conversation" in text(p.status_label)
    assert p.text_edit.toPlainText() == first  # the findings box as before the follow-up
    env.ui.wait_until(lambda: _token_stats(env)["deleted"] > before["deleted"], 10000)
    env.ui.wait_until(job.done.is_set, 10000)
    env.ui.wait(20 * int(TOKEN_STEP_S * 1000))  # long enough for the rest of its 50 words to have come
    assert _token_stats(env)["deleted"] == before["deleted"] + 1  # by DELETE, as Cancel
    assert p.conversation_edit.toPlainText() == "" and p.text_edit.toPlainText() == first
    assert "New conversation" in text(p.status_label) and idle(p)
    assert mrml.scene.GetNumberOfNodes() == nodes and M.list_results(mrml.scene) == [folder]
    assert node.GetAttribute(M.ATTR + CONVERSATION_ATTR) == saved and node.GetText() == saved_text
    return {"follow_up_words_before_new_conversation": len(job.streamed.split())}


def clear_is_disabled_while_a_follow_up_runs(env: Env) -> None:
    """Clear results (it removes the analysis a follow-up's boxes go under) is disabled from Enter until the follow-up
    has ended, failed or been cancelled, as Analyze is."""
    p = env.panel("tokens")
    job = _report_then_streaming_follow_up(env, p)
    assert not p.clear_button.isEnabled() and not p.analyze_button.isEnabled()
    assert p.new_conversation_button.isEnabled()  # it cancels the follow-up
    env.ui.wait_until(lambda: idle(p), 30000)
    assert "(turn 2)" in text(p.status_label) and p.clear_button.isEnabled(), text(p.status_label)
    p.follow_up_edit.setText("and now?")
    env.ui.enter(p.follow_up_edit)
    job = p.job
    assert job is not None and not p.clear_button.isEnabled()
    env.ui.wait_until(lambda: "tok3" in job.streamed, 10000)
    env.ui.click(p.cancel_button)
    assert idle(p) and p.clear_button.isEnabled() and "Cancelled" in text(p.status_label)
    # a follow-up that fails: the built-in engine answers no free questions (501)
    p.url_edit.setText(env.urls["builtin"])
    select_task(p, "Detect")
    run_and_wait(env, p)
    p.follow_up_edit.setText("is there a mass?")
    env.ui.enter(p.follow_up_edit)
    assert p.job is not None and not p.clear_button.isEnabled()
    env.ui.wait_until(lambda: idle(p), 20000)
    assert_error_shown(p, "501")
    assert p.clear_button.isEnabled()
    env.ui.click(p.clear_button)
    assert rows(p) == 0 and M.list_results(env.mrml.scene) == []


def destroyed_soon_after_cancel(env: Env) -> dict:
    """The panel cleaned up and its widget destroyed (what Slicer does on Reload and on exit) right after Cancel of a
    streamed answer, before the DELETE is answered and before Cancel's wait for it runs out: the callbacks that come
    afterwards (the wait's end, the aborted replies) are dropped silently, no exception reaches Python's excepthook
    (before, the wait's end called abort() on the deleted reply); the engine stops decoding (the connection went with
    the widget); a second cleanup does nothing."""
    import sys

    mrml = env.mrml
    M.clear_results(mrml.scene)
    p = Panel(AnalysisLogic(mrml.scene, lambda: dict(mrml.slice_logics)))  # not registered: it is destroyed here
    p.widget.show()
    p.url_edit.setText(env.urls["tokens"])
    p.runner.cancel_wait_ms = 300  # Cancel's wait for the DELETE's answer, shortened (2 s by default)
    select_task(p, "Report")
    before = _token_stats(env)
    env.ui.click(p.analyze_button)
    job = p.job
    env.ui.wait_until(lambda: "tok3" in job.streamed, 10000)
    nodes = mrml.scene.GetNumberOfNodes()
    destroyed: list[bool] = []
    p.widget.destroyed.connect(lambda: destroyed.append(True))
    caught: list[str] = []
    hook = sys.excepthook
    sys.excepthook = lambda kind, value, tb: caught.append(f"{kind.__name__}: {value}")
    try:
        env.ui.click(p.cancel_button)
        p.cleanup()
        p.widget.deleteLater()
        qt.QApplication.sendPostedEvents(None, int(qt.QEvent.DeferredDelete))
        assert destroyed == [True]
        env.ui.wait(3 * int(p.runner.cancel_wait_ms))
        stopped = _token_stats(env)["steps"]
        env.ui.wait(10 * int(TOKEN_STEP_S * 1000))
    finally:
        sys.excepthook = hook
    assert caught == [], caught
    after = _token_stats(env)["steps"]
    assert after == stopped and stopped - before["steps"] < 50, (before, stopped, after)
    p.cleanup()
    assert mrml.scene.GetNumberOfNodes() == nodes and M.list_results(mrml.scene) == []
    return {"steps_after_cancel": stopped - before["steps"]}


def gui_thread_check(env: Env) -> None:
    import threading

    seen: list[bool] = []
    t = threading.Thread(target=lambda: seen.append(is_gui_thread()))
    t.start()
    t.join(5)
    assert seen == [False] and is_gui_thread()


#: Every scenario, in the order the host runs them.
SCENARIOS: dict[str, Callable[[Env], Any]] = {
    f.__name__: f
    for f in (
        connection,
        task_combo,
        detect_table_rois_and_row_click,
        keep_replace_and_clear,
        identify_with_a_drawn_roi,
        sweep,
        settings_round_trip,
        backend_down,
        wrong_url,
        server_4xx_and_panel_checks,
        server_400_message,
        read_timeout,
        access_token,
        responsive_during_a_slow_analysis,
        negative_control_blocking_call,
        cancel_during_a_slow_request,
        review_buttons_and_keys,
        export_folder,
        conversation,
        ask_needs_a_vlm_engine,
        streamed_answer_and_cancel,
        a_streamed_answer_outlasts_the_read_timeout,
        new_conversation_cancels_a_streamed_follow_up,
        clear_is_disabled_while_a_follow_up_runs,
        destroyed_soon_after_cancel,
        gui_thread_check,
    )
}
