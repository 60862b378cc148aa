"""The real servers the panel scenarios talk to (panel_scenarios.py), on loopback ports in the test process:
the built-in engine, a slow engine, a backend that wants a token, some other web server that answers 404, and a
closed port."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

from fault_engines import SlowEngine
from panel_scenarios import SLOW_DELAY_S, TOKEN

from backend.server_thread import ServerThread, free_port


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


@dataclass
class PanelServers:
    urls: dict[str, str]
    slow: SlowEngine


@contextlib.contextmanager
def panel_servers() -> Iterator[PanelServers]:
    from backend.engines.builtin import BuiltinEngine
    from backend.settings import ServerSettings

    slow = SlowEngine(delay_s=SLOW_DELAY_S)
    other = ThreadingHTTPServer(("127.0.0.1", 0), _NotTheBackend)
    Thread(target=other.serve_forever, daemon=True).start()
    try:
        with (
            ServerThread(BuiltinEngine()) as builtin,
            ServerThread(slow) as slow_url,
            ServerThread(BuiltinEngine(), settings=ServerSettings(token=TOKEN)) as token,
        ):
            yield PanelServers(
                urls={
                    "builtin": builtin,
                    "slow": slow_url,
                    "token": token,
                    "not_backend": f"http://127.0.0.1:{other.server_address[1]}",
                    "closed": f"http://127.0.0.1:{free_port()}",
                },
                slow=slow,
            )
    finally:
        other.shutdown()
        other.server_close()
