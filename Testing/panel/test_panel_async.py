"""The panel never blocks the GUI thread: a heartbeat QTimer keeps ticking while a slow request (a real server whose
engine sleeps) is in flight; Cancel returns the panel to idle at once and the late answer never reaches the scene.
A negative control checks that the heartbeat does catch a blocked GUI thread. (panel_scenarios.py; the same
scenarios run under Slicer's PythonQt in test_panel_pythonqt.py.)"""

from __future__ import annotations

import panel_scenarios as PS

pytest_plugins = ["panel_fixtures"]  # the mrml, servers and env fixtures


def test_gui_stays_responsive_during_a_slow_analysis(env):
    PS.responsive_during_a_slow_analysis(env)


def test_negative_control_a_blocking_call_is_detected(env):
    PS.negative_control_blocking_call(env)


def test_cancel_during_a_slow_request(env):
    PS.cancel_during_a_slow_request(env)


def test_is_gui_thread_tells_the_worker_from_the_main_thread(env):
    PS.gui_thread_check(env)


def test_streamed_answer_and_cancel_by_delete(env):
    PS.streamed_answer_and_cancel(env)


def test_a_streamed_answer_outlasts_the_read_timeout(env):
    PS.a_streamed_answer_outlasts_the_read_timeout(env)
