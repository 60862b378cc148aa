"""Review and export in the real panel (PySide6, offscreen) on a real slicer-core scene with the built-in engine
behind a real server: Accept / Reject / Accept all / Reject all, the table's review keys, Edit (the ROI unlocked,
moved in code, the row following it), rejected rows hidden, and Export into a folder (table, markups, and the SR
of a DICOM series). The same scenarios run under Slicer's PythonQt in test_panel_pythonqt.py."""

from __future__ import annotations

import panel_scenarios as PS

pytest_plugins = ["panel_fixtures"]  # the mrml, servers, small_dicom_dir and env fixtures


def test_review_buttons_keys_edit_and_hidden_rejected_rows(env):
    PS.review_buttons_and_keys(env)


def test_export_into_a_folder_table_markups_and_sr(env):
    PS.export_folder(env)
