"""The panel never blocks the GUI thread: a heartbeat QTimer keeps ticking while a slow request (a real server whose
engine sleeps) is in flight; Cancel returns the panel to idle at once and the late answer never reaches the scene.
A negative control checks that the heartbeat does catch a blocked GUI thread."""

from __future__ import annotations

import time

from fault_engines import SlowEngine
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib.capture import capture_slice, to_request
from MiniGPTMedSlicerLib.client import BackendClient
from MiniGPTMedSlicerQt.qt_compat import qt
from panel_helpers import Heartbeat, idle, make_panel, select_task

from backend.server_thread import ServerThread

pytest_plugins = ["panel_fixtures"]  # the mrml and panel fixtures

DELAY_S = 1.5
TICK_MS = 20


def test_gui_stays_responsive_during_a_slow_analysis(qtbot, mrml):
    M.clear_results(mrml.scene)
    engine = SlowEngine(delay_s=DELAY_S)
    with ServerThread(engine) as url:
        p = make_panel(qtbot, mrml, url)
        select_task(p, "Report")
        beat = Heartbeat(p.widget, TICK_MS)
        beat.start()
        t0 = time.monotonic()
        qtbot.mouseClick(p.analyze_button, qt.Qt.LeftButton)
        assert time.monotonic() - t0 < 0.5  # the click handler returned while the request is in flight
        assert p.job is not None and not p.analyze_button.isEnabled() and p.cancel_button.isEnabled()
        assert p.progress.maximum() == 0  # busy indicator
        qtbot.waitUntil(lambda: idle(p), timeout=15000)
        t1 = time.monotonic()
        beat.stop()
        assert t1 - t0 >= DELAY_S, "the slow engine was not slow"
        window = beat.between(t0, t0 + DELAY_S)
        assert len(window) >= 0.5 * DELAY_S * 1000 / TICK_MS, len(window)
        assert beat.largest_gap(t0, t1) < 0.25, beat.largest_gap(t0, t1)
        # and the answer was applied on the main thread once it came
        assert f"slept {DELAY_S:.2f}s" in p.text_edit.toPlainText(), p.status_label.text()
        assert len(M.list_results(mrml.scene)) == 1 and engine.finished == 1
        p.cleanup()
    M.clear_results(mrml.scene)


def test_negative_control_a_blocking_call_is_detected(qtbot, mrml):
    """The same heartbeat sees a gap when the same request is made on the GUI thread (what the panel must not do)."""
    with ServerThread(SlowEngine(delay_s=DELAY_S)) as url:
        p = make_panel(qtbot, mrml, url)
        beat = Heartbeat(p.widget, TICK_MS)
        beat.start()
        qtbot.wait(100)
        t0 = time.monotonic()
        BackendClient(url).analyze(to_request(capture_slice(mrml.slice_logics["Red"]), "report"))
        qtbot.wait(100)
        t1 = time.monotonic()
        beat.stop()
        assert beat.largest_gap(t0, t1) >= DELAY_S * 0.9
        p.cleanup()


def test_cancel_during_a_slow_request(qtbot, mrml):
    M.clear_results(mrml.scene)
    before = mrml.scene.GetNumberOfNodes()
    engine = SlowEngine(delay_s=2.0)
    with ServerThread(engine) as url:
        p = make_panel(qtbot, mrml, url)
        select_task(p, "Detect")
        qtbot.mouseClick(p.analyze_button, qt.Qt.LeftButton)
        qtbot.waitUntil(lambda: engine.started == 1, timeout=5000)  # the request reached the engine
        assert p.job is not None and not p.analyze_button.isEnabled()
        job = p.job
        qtbot.mouseClick(p.cancel_button, qt.Qt.LeftButton)
        assert idle(p) and "Cancelled" in p.status_label.text()
        assert p.progress.maximum() == 100 and p.progress.value() == 0
        qtbot.waitUntil(job.done.is_set, timeout=10000)  # the late answer arrives on the worker ...
        qtbot.wait(200)  # ... and the (stopped) poll timer never applies it
        assert not p.timer.isActive()
        p.cleanup()
    assert mrml.scene.GetNumberOfNodes() == before and M.list_results(mrml.scene) == []
    assert p.table.rowCount() == 0 and p.text_edit.toPlainText() == ""


def test_is_gui_thread_tells_the_worker_from_the_main_thread(qtbot):
    import threading

    from MiniGPTMedSlicerQt.qt_compat import is_gui_thread

    seen = []
    t = threading.Thread(target=lambda: seen.append(is_gui_thread()))
    t.start()
    t.join(5)
    assert seen == [False] and is_gui_thread()
