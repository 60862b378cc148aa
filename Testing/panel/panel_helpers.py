"""Helpers of the panel tests (Testing/panel/test_panel_*.py). No mocks: the backend is a real server on a loopback port."""

from __future__ import annotations

import itertools
import time

from MiniGPTMedSlicerLib.logic import AnalysisLogic
from MiniGPTMedSlicerQt.panel import Panel
from MiniGPTMedSlicerQt.qt_compat import qt


def make_panel(qtbot, mrml, url=None, settings=None, timeouts=None) -> Panel:
    logic = AnalysisLogic(mrml.scene, lambda: dict(mrml.slice_logics), timeouts=timeouts)
    p = Panel(logic, settings=settings)
    qtbot.addWidget(p.widget)
    p.widget.show()
    if url is not None:
        p.url_edit.setText(url)
    return p


def idle(p: Panel) -> bool:
    return p.job is None and p.analyze_button.isEnabled() and not p.cancel_button.isEnabled()


def select_task(p: Panel, name: str) -> None:
    i = p.task_combo.findText(name)
    assert i >= 0, name
    p.task_combo.setCurrentIndex(i)


def run_and_wait(qtbot, p: Panel, timeout_ms: int = 20000) -> str:
    """Click Analyze, wait until the panel is idle again, return the status line."""
    qtbot.mouseClick(p.analyze_button, qt.Qt.LeftButton)
    qtbot.waitUntil(lambda: idle(p), timeout=timeout_ms)
    return p.status_label.text()


class Heartbeat:
    """A 20 ms QTimer on the GUI thread recording when it fired: gaps show when the event loop was blocked."""

    def __init__(self, parent, interval_ms: int = 20):
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
