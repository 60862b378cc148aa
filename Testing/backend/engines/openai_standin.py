"""A stand-in for a remote OpenAI-compatible server (vLLM, SGLang, Ollama cannot run here) that speaks the real
streaming protocol on a real socket: ``GET /v1/models``; ``POST /v1/chat/completions`` answered as one JSON
completion, or with ``"stream": true`` as vLLM answers it: HTTP/1.1 chunked ``text/event-stream``, a first chunk with
the role, one ``chat.completion.chunk`` per scripted piece (``choices[0].delta.content``), a chunk with the finish
reason, a usage chunk (``choices: []``) when ``stream_options.include_usage`` asks for it, then ``data: [DONE]``.

What the tests script (reset with :meth:`script`): the pieces; ``split_bytes`` writes each event in two HTTP chunks cut
inside its first multi-byte UTF-8 character; ``fail_after=N`` sends N pieces then vLLM's mid-stream error object;
``hold_after=N`` waits after N pieces until the test sets ``release`` (so a test can see deltas arrive before the
answer is complete), watching the socket meanwhile as a server does: the client closing the connection sets
``disconnected`` and ends the stream (vLLM then aborts the request).
"""

from __future__ import annotations

import threading
import time

from loopback_http import DONE_EVENT, FAILED_MIDSTREAM, EventStreamHandler, LoopbackServer, event, wait_for_release

MODEL = "standin-vlm"


class OpenAIStandIn(LoopbackServer):
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.script(["ok"])
        super().__init__(_handler(self))

    def script(
        self,
        pieces: list[str],
        split_bytes: bool = False,
        fail_after: int | None = None,
        hold_after: int | None = None,
    ) -> None:
        self.pieces, self.split_bytes, self.fail_after = list(pieces), split_bytes, fail_after
        self.hold_after = hold_after
        self.release = threading.Event()
        self.disconnected = threading.Event()
        self.streaming = threading.Event()  # set when a stream of this script begins
        self.disconnected_t = 0.0  # time.perf_counter() when the disconnect was seen
        self.sent = 0  # pieces written by the last stream

    def __exit__(self, *exc) -> None:
        self.release.set()
        super().__exit__(*exc)

    def completion(self) -> dict:
        text = "".join(self.pieces)
        return {
            "id": "chatcmpl-standin",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": len(self.pieces), "total_tokens": 7 + len(self.pieces)},
        }

    def stream_events(self, include_usage: bool, gone):
        """The events' bytes in the order they are written; ``gone()`` says whether the client closed the connection."""
        self.streaming.set()
        base = {
            "id": "chatcmpl-standin",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": MODEL,
        }

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            return event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""})
        k = 0
        while k < len(self.pieces):
            if k == self.hold_after and wait_for_release(self.release, gone):
                self.disconnected_t = time.perf_counter()
                self.disconnected.set()
                return
            if k == self.fail_after:
                yield from FAILED_MIDSTREAM
                return
            piece = self.pieces[k]
            k += 1
            self.sent = k  # counted before the write: the client may read it before this thread runs on
            yield chunk({"content": piece})
        yield chunk({}, "stop")
        if include_usage:
            n = len(self.pieces)
            yield event(
                {**base, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}}
            )
        yield DONE_EVENT


def _cut_inside_a_character(data: bytes) -> int | None:
    """The offset of the second byte of the first multi-byte UTF-8 character in ``data``, or None."""
    for i, b in enumerate(data):
        if b >= 0xC0:
            return i + 1
    return None


def _handler(standin: OpenAIStandIn):
    class Handler(EventStreamHandler):
        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
            else:
                self.send_json(404, {"error": {"message": "not found"}})

        def do_POST(self):
            body = self.read_json()
            standin.bodies.append(body)
            if self.path.rstrip("/") != "/v1/chat/completions":
                self.send_json(404, {"error": {"message": "not found"}})
            elif not body.get("stream"):
                self.send_json(200, standin.completion())
            else:
                self._stream(bool((body.get("stream_options") or {}).get("include_usage")))

        def _stream(self, include_usage: bool) -> None:
            self.start_event_stream()
            try:
                for data in standin.stream_events(include_usage, self.client_gone):
                    cut = _cut_inside_a_character(data) if standin.split_bytes else None
                    for part in (data,) if cut is None else (data[:cut], data[cut:]):
                        self.write_chunk(part)
                self.end_event_stream()
            except (BrokenPipeError, ConnectionResetError):
                standin.disconnected_t = time.perf_counter()
                standin.disconnected.set()
                self.close_connection = True

    return Handler
