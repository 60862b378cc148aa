"""What the stand-ins for remote OpenAI-compatible servers share (vLLM, SGLang, Ollama cannot run here; see
openai_standin.py, vllm_standin.py and the tests' own): a threaded HTTP server on a free loopback port served from a
daemon thread, a request handler that reads and writes JSON bodies, and what their vLLM-style event streams share
(events, the mid-stream failure, a pause a test releases)."""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet handler with JSON bodies in and out."""

    def log_message(self, *a):
        pass

    def read_json(self) -> Any:
        """The request's body as JSON (ValueError when it is not)."""
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class EventStreamHandler(JSONHandler):
    """JSON in, and a ``text/event-stream`` answer written as HTTP/1.1 chunks, as vLLM streams; :meth:`client_gone`
    watches the socket while the server has nothing to write (the client closing it is what vLLM aborts on)."""

    protocol_version = "HTTP/1.1"

    def start_event_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_chunk(self, part: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))

    def end_event_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def client_gone(self) -> bool:
        """The client closed its end: the socket is readable and holds nothing more (EOF) or was reset."""
        if not select.select([self.connection], [], [], 0)[0]:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def event(obj: Any) -> bytes:
    """One server-sent event holding ``obj`` as JSON, as vLLM writes them."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
#: what vLLM sends when generation fails after the stream started
FAILED_MIDSTREAM = (
    event({"error": {"object": "error", "message": "CUDA error: device-side assert", "code": 500}}),
    DONE_EVENT,
)


def wait_for_release(release: threading.Event, gone: Callable[[], bool], seconds: float = 30) -> bool:
    """A stand-in's pause mid-stream: wait until the test sets ``release`` (at most ``seconds``) while watching
    ``gone()``; True when the client closed the connection meanwhile."""
    t_end = time.monotonic() + seconds
    while not release.wait(0.005) and time.monotonic() < t_end:
        if gone():
            return True
    return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client left before the answer was written (a timeout or cancel test), as a server shrugs it off
        super().handle_error(request, client_address)


class LoopbackServer:
    """``handler`` on 127.0.0.1 at a free port: served from a daemon thread while in a ``with`` block; :attr:`url` is
    its OpenAI base URL (``…/v1``)."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = _Server(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
