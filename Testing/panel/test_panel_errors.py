"""What the user sees when things go wrong, with real servers and real sockets: a clear message in the panel, the
panel idle again, and the scene exactly as it was."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest
from fault_engines import SlowEngine
from MiniGPTMedSlicerLib import markups as M
from MiniGPTMedSlicerLib.client import Timeouts
from MiniGPTMedSlicerQt.qt_compat import qt
from panel_helpers import idle, make_panel, run_and_wait, select_task

from backend.server_thread import ServerThread, free_port

pytest_plugins = ["panel_fixtures"]  # the mrml and panel fixtures


class _SceneUnchanged:
    def __init__(self, scene):
        self.scene = scene

    def __enter__(self):
        self.before = (self.scene.GetNumberOfNodes(), len(M.list_results(self.scene)))
        return self

    def __exit__(self, *exc):
        assert (self.scene.GetNumberOfNodes(), len(M.list_results(self.scene))) == self.before


def _assert_error_shown(p, *needles):
    text = p.status_label.text()
    assert text.startswith("Error: "), text
    for n in needles:
        assert n in text, (n, text)
    assert "c62828" in p.status_label.styleSheet()  # shown in red
    assert idle(p)


def test_backend_down_gives_a_clear_message_and_no_change(qtbot, panel, mrml):
    panel.url_edit.setText(f"http://127.0.0.1:{free_port()}")  # a closed port
    select_task(panel, "Report")
    with _SceneUnchanged(mrml.scene):
        run_and_wait(qtbot, panel)
    _assert_error_shown(panel, "Cannot reach the backend", "Is it running?", "minigptmed-backend serve")
    assert panel.table.rowCount() == 0 and panel.text_edit.toPlainText() == ""
    qtbot.mouseClick(panel.test_button, qt.Qt.LeftButton)
    qtbot.waitUntil(lambda: idle(panel), timeout=20000)
    assert panel.connection_label.text() == "Not connected"
    _assert_error_shown(panel, "Is it running?")


class _NotTheBackend(BaseHTTPRequestHandler):
    """Some other web server: every path is 404 with an HTML body."""

    def do_GET(self):
        self._404()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._404()

    def _404(self):
        body = b"<html><body>Not Found</body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def other_web_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _NotTheBackend)
    Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_wrong_url_is_explained(qtbot, panel, mrml, other_web_server):
    select_task(panel, "Detect")
    panel.url_edit.setText(other_web_server)  # a web server, but not ours
    with _SceneUnchanged(mrml.scene):
        run_and_wait(qtbot, panel)
    _assert_error_shown(panel, "was not found", "Is http://127.0.0.1:", "the address of a MiniGPTMedSlicer backend?")
    panel.url_edit.setText("127.0.0.1:8765")  # no scheme
    with _SceneUnchanged(mrml.scene):
        run_and_wait(qtbot, panel)
    _assert_error_shown(panel, "must start with http:// or https://")


def test_server_4xx_message_reaches_the_user(qtbot, panel, mrml):
    with _SceneUnchanged(mrml.scene):
        select_task(panel, "Ask")
        panel.question_edit.setText("Is there a haemorrhage?")
        run_and_wait(qtbot, panel)
        # the builtin engine cannot answer questions: the server's 501 message names the engines that can
        _assert_error_shown(panel, "--engine minigptmed", "501")
        # checked in the panel before anything is sent
        panel.question_edit.setText("")
        qtbot.mouseClick(panel.analyze_button, qt.Qt.LeftButton)
        _assert_error_shown(panel, "Type a question")
        select_task(panel, "Locate")
        qtbot.mouseClick(panel.analyze_button, qt.Qt.LeftButton)
        _assert_error_shown(panel, "phrase to locate")
        select_task(panel, "Identify region")
        assert panel.region_combo.count() == 0
        qtbot.mouseClick(panel.analyze_button, qt.Qt.LeftButton)
        _assert_error_shown(panel, "needs an ROI")


def test_server_400_message_reaches_the_user(qtbot, panel, mrml):
    """The server's own 400 message (not a check in the panel) reaches the status line."""
    select_task(panel, "Detect")
    panel.question_edit.setText("mass " * 420)  # 2100 characters: over the server's question limit
    with _SceneUnchanged(mrml.scene):
        run_and_wait(qtbot, panel)
    _assert_error_shown(panel, "question is 2099 characters; the limit is 2000", "(HTTP 400)")


def test_timeout_is_explained(qtbot, mrml):
    M.clear_results(mrml.scene)
    with ServerThread(SlowEngine(delay_s=5.0)) as url:
        p = make_panel(qtbot, mrml, url, timeouts=Timeouts(connect_s=2.0, health_s=2.0, analyze_s=0.5))
        select_task(p, "Report")
        with _SceneUnchanged(mrml.scene):
            run_and_wait(qtbot, p, 10000)
        _assert_error_shown(p, "did not answer within 0.5 s")
        p.cleanup()


def test_access_token_missing_then_given(qtbot, mrml, tmp_path):
    """A backend started with a token: without it the server's 401 message is shown; with it the analysis runs."""
    from backend.engines.builtin import BuiltinEngine
    from backend.settings import ServerSettings

    M.clear_results(mrml.scene)
    with ServerThread(BuiltinEngine(), settings=ServerSettings(token="s3cret-token")) as url:
        p = make_panel(qtbot, mrml, url)
        select_task(p, "Detect")
        with _SceneUnchanged(mrml.scene):
            run_and_wait(qtbot, p)
        _assert_error_shown(p, "Not authorised (401)")
        p.token_edit.setText("s3cret-token")
        status = run_and_wait(qtbot, p)
        assert "finding(s) from builtin" in status, status
        assert len(M.list_results(mrml.scene)) == 1
        p.cleanup()
    M.clear_results(mrml.scene)
