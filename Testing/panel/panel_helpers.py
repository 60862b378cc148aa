"""Helpers of the panel tests (Testing/panel/test_panel_*.py). No mocks: the backend is a real server on a loopback
port. Most checks live in panel_scenarios.py, which also runs under the PythonQt host."""

from __future__ import annotations

from MiniGPTMedSlicerLib.logic import AnalysisLogic
from MiniGPTMedSlicerQt.panel import Panel
from panel_scenarios import idle, select_task

__all__ = ["idle", "make_panel", "select_task"]


def make_panel(qtbot, mrml, url=None, settings=None, timeouts=None) -> Panel:
    logic = AnalysisLogic(mrml.scene, lambda: dict(mrml.slice_logics), timeouts=timeouts)
    p = Panel(logic, settings=settings)
    qtbot.addWidget(p.widget)
    p.widget.show()
    if url is not None:
        p.url_edit.setText(url)
    return p
