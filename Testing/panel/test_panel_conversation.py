"""The panel's conversation area (PySide6, offscreen) against the tiny offline MiniGPT-Med behind a real server:
two turns about one slice, the server's record of the second request (image id, history), the conversation saved
with the analysis and back from a reopened .mrb, a new conversation when the slice changes. The scenario is
panel_scenarios.conversation, which test_panel_pythonqt.py also runs under Slicer's PythonQt."""

from __future__ import annotations

import panel_scenarios as PS

pytest_plugins = ["panel_fixtures"]  # the mrml, servers and env fixtures


def test_two_turn_conversation_saved_and_restored(env):
    PS.conversation(env)


def test_the_question_box_needs_an_engine_that_answers_free_questions(env):
    PS.ask_needs_a_vlm_engine(env)
