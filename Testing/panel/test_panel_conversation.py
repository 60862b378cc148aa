"""The panel's conversation area (PySide6, offscreen) against the tiny offline MiniGPT-Med behind a real server:
two turns about one slice, the server's record of the second request (image id, history), the conversation saved
with the analysis and back from a reopened .mrb, a new conversation when the slice changes. With the decoding
stand-in: New conversation cancels a streamed follow-up (DELETE) and nothing of it is drawn; Clear is disabled while a
follow-up runs; a panel destroyed right after Cancel drops the late callbacks. The scenarios are in panel_scenarios.py,
and test_panel_pythonqt.py also runs them under Slicer's PythonQt."""

from __future__ import annotations

import panel_scenarios as PS

pytest_plugins = ["panel_fixtures"]  # the mrml, servers and env fixtures


def test_two_turn_conversation_saved_and_restored(env):
    PS.conversation(env)


def test_the_question_box_needs_an_engine_that_answers_free_questions(env):
    PS.ask_needs_a_vlm_engine(env)


def test_new_conversation_cancels_a_streamed_follow_up(env):
    PS.new_conversation_cancels_a_streamed_follow_up(env)


def test_clear_is_disabled_while_a_follow_up_runs(env):
    PS.clear_is_disabled_while_a_follow_up_runs(env)


def test_destroyed_soon_after_cancel_drops_the_late_callbacks(env):
    PS.destroyed_soon_after_cancel(env)
