"""The real panel (PySide6, offscreen) driven with pytest-qt against a real slicer-core scene holding the real MNI
volume and the built-in engine behind a real uvicorn server on a loopback port: the paths that succeed. The checks
are the scenarios of panel_scenarios.py, which test_panel_pythonqt.py also runs under Slicer's PythonQt."""

from __future__ import annotations

import panel_scenarios as PS

pytest_plugins = ["panel_fixtures"]  # the mrml, servers, env and panel fixtures


def test_test_connection_shows_engine_model_and_tasks(env):
    PS.connection(env)


def test_task_combo_lists_the_protocol_tasks_then_the_sweep(env):
    PS.task_combo(env)


def test_detect_fills_table_and_scene_and_row_click_jumps(env):
    PS.detect_table_rois_and_row_click(env)


def test_keep_earlier_results_and_clear(env):
    PS.keep_replace_and_clear(env)


def test_identify_region_uses_a_drawn_roi(env):
    PS.identify_with_a_drawn_roi(env)


def test_sweep_from_the_panel(env):
    PS.sweep(env)


def test_settings_are_stored_as_strings_and_read_back(env):
    PS.settings_round_trip(env)
