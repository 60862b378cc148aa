"""The real servers the panel scenarios talk to (panel_scenarios.py), on loopback ports in the test process:
the built-in engine, a slow engine, a backend that wants a token, the tiny offline MiniGPT-Med (the conversation
scenario; it also answers ``GET /test/seen`` with what its engine was given, so a scenario running in another
process checks the requests on the server's side), some other web server that answers 404, and a closed port."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

from fault_engines import SlowEngine
from panel_scenarios import SLOW_DELAY_S, TOKEN, TOKEN_STEP_S

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


def recording_minigpt():
    """The tiny MiniGPT-Med (minigpt_fixtures), recording what each ``/v1/analyze`` request carried (its image
    inline, or a stored image's id), the task, question and history its engine got, and what it answered."""
    from minigpt_fixtures import tiny_files

    from backend.engines.minigptmed import MiniGPTMedEngine
    from backend.settings import MiniGPTMedSettings

    class Recording(MiniGPTMedEngine):
        def __init__(self, settings):
            super().__init__(settings)
            self.seen: list[dict] = []

        def analyze_batch(self, inputs, stop):
            results = super().analyze_batch(inputs, stop)
            self.seen.extend(
                {
                    "task": i.task,
                    "question": i.question,
                    "history": [[t.task, t.question, t.answer] for t in i.history],
                    "raw_output": r.raw_output,
                }
                for i, r in zip(inputs, results, strict=True)
            )
            return results

    t = tiny_files()
    engine = Recording(
        MiniGPTMedSettings(
            eva=str(t.eva), llama=str(t.llama), checkpoint=str(t.checkpoint), model_config=str(t.model_config)
        )
    )

    sent: list[dict] = []  # what each /v1/analyze request carried: its image inline, or the id of a stored one

    def routes(app, service) -> None:
        prepare = service.prepare

        def recording_prepare(body, *args):
            sent.append({"image": body.image is not None, "image_id": body.image_id})
            return prepare(body, *args)

        service.prepare = recording_prepare
        app.add_api_route(
            "/test/seen", lambda: [{**s, **e} for s, e in zip(sent, engine.seen, strict=False)], methods=["GET"]
        )

    return engine, routes


def token_server():
    """The decoding stand-in (stream_engines.TokenEngine: 50 words, one per step), answering ``GET /test/cancels``
    with how many ``DELETE /v1/requests/{id}`` cancelled a running request and how many decode steps the engine
    has made."""
    from stream_engines import TokenEngine

    engine = TokenEngine(step_s=TOKEN_STEP_S)
    deleted = [0]

    def routes(app, service) -> None:
        cancel = service.cancel

        def counting_cancel(request_id):
            ok = cancel(request_id)
            deleted[0] += bool(ok)
            return ok

        service.cancel = counting_cancel
        app.add_api_route(
            "/test/cancels",
            lambda: {
                "deleted": deleted[0],
                "steps": engine.steps,
            },
            methods=["GET"],
        )

    return engine, routes


@contextlib.contextmanager
def panel_servers() -> Iterator[PanelServers]:
    from backend.engines.builtin import BuiltinEngine
    from backend.settings import ServerSettings

    slow = SlowEngine(delay_s=SLOW_DELAY_S)
    minigpt, minigpt_routes = recording_minigpt()
    tokens, token_routes = token_server()
    other = ThreadingHTTPServer(("127.0.0.1", 0), _NotTheBackend)
    Thread(target=other.serve_forever, daemon=True).start()
    try:
        with (
            ServerThread(BuiltinEngine()) as builtin,
            ServerThread(slow) as slow_url,
            ServerThread(BuiltinEngine(), settings=ServerSettings(token=TOKEN)) as token,
            ServerThread(minigpt, extra_routes=minigpt_routes, startup_timeout_s=120) as minigpt_url,
            ServerThread(tokens, extra_routes=token_routes) as tokens_url,
        ):
            yield PanelServers(
                urls={
                    "builtin": builtin,
                    "slow": slow_url,
                    "token": token,
                    "minigpt": minigpt_url,
                    "tokens": tokens_url,
                    "not_backend": f"http://127.0.0.1:{other.server_address[1]}",
                    "closed": f"http://127.0.0.1:{free_port()}",
                },
                slow=slow,
            )
    finally:
        other.shutdown()
        other.server_close()
