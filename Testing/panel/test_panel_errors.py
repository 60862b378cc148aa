"""What the user sees when things go wrong, with real servers and real sockets: a clear message in the panel, the
panel idle again, and the scene exactly as it was. (panel_scenarios.py; the same scenarios run under Slicer's
PythonQt in test_panel_pythonqt.py.)"""

from __future__ import annotations

import panel_scenarios as PS

pytest_plugins = ["panel_fixtures"]  # the mrml, servers and env fixtures


def test_backend_down_gives_a_clear_message_and_no_change(env):
    PS.backend_down(env)


def test_wrong_url_is_explained(env):
    PS.wrong_url(env)


def test_server_4xx_message_reaches_the_user(env):
    PS.server_4xx_and_panel_checks(env)


def test_server_400_message_reaches_the_user(env):
    PS.server_400_message(env)


def test_timeout_is_explained(env):
    PS.read_timeout(env)


def test_access_token_missing_then_given(env):
    PS.access_token(env)
