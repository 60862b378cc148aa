"""Reading a remote server's server-sent events (an OpenAI-compatible ``"stream": true`` answer: vLLM, SGLang,
Ollama) so that a cancel stops it: what the openai engine and MiniGPT-Med's vLLM client share.

:func:`sse_data` yields each event's ``data`` until ``data: [DONE]``. A watcher thread checks ``stopped()`` every
20 ms and shuts the socket down when it turns true, so a cancel or a deadline does not wait for the remote server's
next chunk (a long prefill, its own queue): the blocked read returns, the remote server sees the disconnect and
aborts the request (vLLM does), and :class:`StreamStopped` is raised. Without a reachable socket the check between
chunks remains.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator

import requests
import urllib3
from MiniGPTMedSlicerLib.sse import SseParser

WATCH_INTERVAL_S = 0.02


class StreamStopped(Exception):
    """``stopped()`` turned true while the stream was read; the connection is closed."""


class StreamBroken(Exception):
    """The connection broke off, or the stream ended without ``data: [DONE]``."""


class StreamEventError(Exception):
    """An event that is not a JSON object, or an ``error`` object (the remote server failed mid-stream)."""


class StreamTimedOut(StreamBroken):
    """Nothing came for longer than the read timeout the stream was opened with."""


def event_object(data: str, server: str) -> dict:
    """One event's ``data`` as a JSON object; StreamEventError (its message starts with ``server``, e.g. "the vLLM
    server at URL") when it is not one or is an ``error`` object (what vLLM sends when generation fails)."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise StreamEventError(f"{server} sent a stream event that is not JSON") from None
    if not isinstance(obj, dict):
        raise StreamEventError(f"{server} sent an unexpected stream event")
    if "error" in obj:
        err = obj["error"]
        msg = err.get("message") if isinstance(err, dict) else err
        raise StreamEventError(f"{server} failed mid-answer: {str(msg)[:300]}")
    return obj


def is_event_stream(r: requests.Response) -> bool:
    """Whether the server answered with a stream (one that ignored ``stream`` sends one JSON body)."""
    return r.headers.get("content-type", "").startswith("text/event-stream")


def sse_data(r: requests.Response, stopped: Callable[[], bool]) -> Iterator[str]:
    """The ``data`` of each event of ``r`` (opened with ``stream=True``) until ``data: [DONE]`` (not yielded)."""
    parser = SseParser()
    done = threading.Event()
    _watch(r, stopped, done)
    try:
        try:
            for chunk in r.iter_content(chunk_size=None):
                if stopped():
                    break
                for ev in parser.feed(chunk):
                    if ev.data.strip() == "[DONE]":
                        return
                    yield ev.data
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            if not stopped():
                if e.args and isinstance(e.args[0], urllib3.exceptions.ReadTimeoutError):  # requests wraps it so
                    raise StreamTimedOut("no data within the read timeout") from None
                raise StreamBroken("the connection broke off") from None
        if stopped():
            r.close()  # the remote server sees the disconnect and stops generating
            raise StreamStopped
        raise StreamBroken("the stream ended without data: [DONE]")
    finally:
        done.set()


def _watch(r: requests.Response, stopped: Callable[[], bool], done: threading.Event) -> None:
    """Shut the stream's socket down as soon as ``stopped()`` (checked every 20 ms until ``done``)."""
    sock = getattr(getattr(r.raw, "connection", None), "sock", None)
    if sock is None:
        return

    def run() -> None:
        while not done.wait(WATCH_INTERVAL_S):
            if stopped():
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                return

    threading.Thread(target=run, name="remote-stream-cancel", daemon=True).start()
