"""Streaming and cancel over a real socket, with the decoding stand-in (Testing/stream_engines.py) behind the real
uvicorn server: a multi-byte answer split inside its characters, an engine failure mid-stream, cancel by disconnect
and by DELETE /v1/requests/{id} (the engine idle within a step, the next request served), and a batch that keeps its
other row."""

from __future__ import annotations

import base64
import gc
import threading
import time

import numpy as np
import pytest
import requests
from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib.client import BackendClient
from MiniGPTMedSlicerLib.png import encode_png
from MiniGPTMedSlicerLib.sse import SseParser
from stream_engines import TokenEngine

from backend.server_thread import ServerThread
from backend.settings import ServerSettings

IMG = base64.b64encode(encode_png(np.full((24, 40), 90, np.uint8))).decode()
STEP_S = 0.02


@pytest.fixture(scope="module")
def served():
    engine = TokenEngine(step_s=STEP_S)
    st = ServerThread(engine, ServerSettings(batch_window_s=0.3))
    with st as url:
        yield url, engine, st.app.state.service


def _events(r):
    parser, out = SseParser(), []
    for chunk in r.iter_content(chunk_size=None):
        out += parser.feed(chunk)
    return out


def _wait_idle(service, timeout_s=5.0) -> float:
    t0 = time.monotonic()
    while service.engine_busy and time.monotonic() - t0 < timeout_s:
        time.sleep(0.001)
    return time.monotonic() - t0


def test_multibyte_answer_split_inside_characters(served):
    url, _, _ = served
    answer = "Épanchement à gauche: 東京 ✓ ok"
    body = {"task": "report", "image": IMG, "prompt": "bytes:" + answer, "stream": True}
    events = _events(requests.post(f"{url}/v1/analyze", json=body, stream=True, timeout=30))
    deltas = [e.json()["text"] for e in events if e.event == "delta"]
    assert len(deltas) >= 10 and all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == answer == events[-1].json()["text"]


def test_engine_error_mid_stream(served):
    url, _, _ = served
    body = {"task": "report", "image": IMG, "prompt": "fail:3", "stream": True}
    events = _events(requests.post(f"{url}/v1/analyze", json=body, stream=True, timeout=30))
    assert [e.event for e in events] == ["delta"] * 3 + ["error"]
    err = protocol.from_dict(protocol.ErrorBody, events[-1].json()).error
    assert err.code == "engine_error" and "after 3 tokens" in err.message
    assert requests.post(f"{url}/v1/analyze", json={"task": "report", "image": IMG, "prompt": "a b"}).status_code == 200


def test_cancel_by_disconnect_frees_the_engine(served):
    url, engine, service = served
    steps0 = engine.steps
    stream = BackendClient(url).stream(protocol.AnalyzeRequest(task="report", image=IMG, max_new_tokens=500))
    it = iter(stream)
    assert next(it).startswith("tok0")
    stream.close()
    idle = _wait_idle(service)
    assert not service.engine_busy and idle < 2.0
    assert engine.steps - steps0 < 100  # far from the 500 tokens asked for
    r = requests.post(f"{url}/v1/analyze", json={"task": "report", "image": IMG, "prompt": "next one"}, timeout=30)
    assert r.status_code == 200 and r.json()["text"] == "nextone"


def test_cancel_plain_request_by_disconnect(served):
    url, engine, service = served
    steps0 = engine.steps
    body = {"task": "report", "image": IMG, "max_new_tokens": 500}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{url}/v1/analyze", json=body, timeout=(2, 0.3))  # the client gives up and closes
    _wait_idle(service)
    assert not service.engine_busy and engine.steps - steps0 < 100


@pytest.mark.parametrize("how", ["plain", "stream", "chat_stream"])
def test_a_client_that_left_leaves_no_asyncio_error(served, caplog, how):
    """The job a departed client leaves behind ends with the cancelled error nobody awaits any more, and a stream's
    wait for its next piece is dropped: the server's log must not say "Future exception was never retrieved" or "Task
    was destroyed but it is pending!" (asyncio's error lines) for every such cancel."""
    url, _, service = served
    if how == "plain":
        body = {"task": "report", "image": IMG, "max_new_tokens": 500}
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{url}/v1/analyze", json=body, timeout=(2, 0.3))  # the client gives up and closes
    else:
        path, body = "/v1/analyze", {"task": "report", "image": IMG, "max_new_tokens": 500, "stream": True}
        if how == "chat_stream":
            image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + IMG}}
            content = [image, {"type": "text", "text": "What is seen?"}]
            path, body = "/v1/chat/completions", {"model": "x", "stream": True, "max_tokens": 500}
            body["messages"] = [{"role": "user", "content": content}]
        with requests.post(url + path, json=body, stream=True, timeout=30) as r:
            assert r.status_code == 200, r.text
            next(r.iter_content(chunk_size=None))  # the stream began; the client closes it
    _wait_idle(service)
    r = requests.post(f"{url}/v1/analyze", json={"task": "report", "image": IMG, "prompt": "after"}, timeout=30)
    assert r.status_code == 200  # the left job's outcome was set on the event loop before this answer
    gc.collect()
    assert not [rec for rec in caplog.records if rec.name == "asyncio"], caplog.text


def test_cancel_by_delete_and_the_next_request_starts_within_a_step(served):
    url, engine, _ = served
    client = BackendClient(url)
    stream = client.stream(protocol.AnalyzeRequest(task="report", image=IMG, max_new_tokens=500))
    it = iter(stream)
    next(it)
    assert stream.request_id
    rest: list = []
    reader = threading.Thread(target=lambda: rest.extend(_drain(it)))
    reader.start()
    starts = len(engine.starts)
    nxt: dict = {}

    def follow():
        nxt["r"] = requests.post(f"{url}/v1/analyze", json={"task": "vqa", "image": IMG, "prompt": "x y"}, timeout=30)

    t_next = threading.Thread(target=follow)
    t_next.start()  # waits in the queue behind the long request
    time.sleep(0.1)
    t_cancel = time.monotonic()
    assert client.cancel_request(stream.request_id).cancelled
    t_next.join(10)
    reader.join(10)
    assert nxt["r"].status_code == 200 and nxt["r"].json()["text"] == "xy"
    assert len(engine.starts) == starts + 1 and engine.starts[-1] - t_cancel < 0.5
    assert isinstance(rest[-1], Exception) and getattr(rest[-1], "code", None) == "cancelled"
    r = requests.delete(f"{url}/v1/requests/{stream.request_id}", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"


def _drain(it):
    out: list = []
    try:
        out.extend(it)
    except Exception as e:  # the cancelled stream ends with its error event
        out.append(e)
    return out


def test_a_batch_keeps_its_other_row(served):
    url, engine, _ = served
    long_ = BackendClient(url).stream(protocol.AnalyzeRequest(task="report", image=IMG, max_new_tokens=200))
    short = BackendClient(url).stream(protocol.AnalyzeRequest(task="report", image=IMG, max_new_tokens=30))
    got: dict = {}
    calls = len(engine.calls)
    threads = [
        threading.Thread(target=lambda n=n, s=s: got.update({n: _drain(iter(s))}))
        for n, s in (("long", long_), ("short", short))
    ]
    for t in threads:
        t.start()  # both arrive within the batch window: one engine call
    t_end = time.monotonic() + 5
    while len(engine.calls) == calls and time.monotonic() < t_end:  # the call with both rows has started
        time.sleep(0.01)
    time.sleep(5 * STEP_S)
    assert BackendClient(url).cancel_request(long_.request_id).cancelled
    for t in threads:
        t.join(15)
    assert engine.calls[calls:] == [2], (engine.calls, got)
    assert getattr(got["long"][-1], "code", None) == "cancelled"
    assert "".join(got["short"]) == "".join(f"tok{i} " for i in range(30))
    assert short.response is not None and short.response.text == "".join(got["short"])
