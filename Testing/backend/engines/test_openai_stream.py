"""The openai engine relays the remote server's stream: a stand-in speaking vLLM's streaming protocol on a real socket
(Testing/backend/engines/openai_standin.py) behind the real uvicorn server. Deltas reach our /v1/analyze stream while
the remote answer is still being written, add up to the final text (a multi-byte answer cut inside its characters
by the remote chunks too), a remote error mid-stream is an ``error`` event, and a cancel closes the remote stream."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
import requests
from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib.client import BackendClient
from MiniGPTMedSlicerLib.png import encode_png
from MiniGPTMedSlicerLib.sse import SseParser
from openai_standin import OpenAIStandIn

from backend.engines.openai_engine import OpenAIEngine
from backend.server_thread import ServerThread
from backend.settings import OpenAISettings

IMG = base64.b64encode(encode_png(np.full((30, 44), 120, np.uint8))).decode()


@pytest.fixture(scope="module")
def served():
    with OpenAIStandIn() as standin:
        engine = OpenAIEngine(OpenAISettings(url=standin.url, family="generic"))
        st = ServerThread(engine)
        with st as url:
            yield url, standin, st.app.state.service


def _open(url: str, **body):
    r = requests.post(
        f"{url}/v1/analyze", json={"task": "report", "image": IMG, "stream": True, **body}, stream=True, timeout=30
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    return r


def _events(r, parser=None):
    parser = parser or SseParser()
    for chunk in r.iter_content(chunk_size=None):
        yield from parser.feed(chunk)


def test_deltas_arrive_while_the_remote_answer_is_written(served):
    url, standin, _ = served
    pieces = ["The lungs", " are clear", ".", " No pleural", " effusion."]
    standin.script(pieces, hold_after=2)  # the remote server stops after two pieces until the test has seen them
    deltas, final = [], None
    for ev in _events(_open(url)):
        if ev.event == "delta":
            deltas.append(ev.json()["text"])
            if len(deltas) == 2:
                assert standin.sent == 2  # the rest is not written yet
                standin.release.set()
        else:
            assert ev.event == "done", ev
            final = ev.json()
    assert len(deltas) >= 3 and "".join(deltas) == "".join(pieces) == final["text"] == final["raw_output"]
    sent = standin.bodies[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert final["timings_ms"]["new_tokens"] == len(pieces) and final["timings_ms"]["prompt_tokens"] == 7


def test_multibyte_answer_cut_inside_characters_by_the_remote_chunks(served):
    url, standin, _ = served
    pieces = ["Ép", "anchement à gauche: 東", "京 ✓", " ok"]
    standin.script(pieces, split_bytes=True)
    events = list(_events(_open(url)))
    deltas = [e.json()["text"] for e in events if e.event == "delta"]
    assert len(deltas) >= 2 and all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "".join(pieces) == events[-1].json()["text"]


def test_remote_error_mid_stream_is_an_error_event(served):
    url, standin, _ = served
    standin.script(["one", " two", " three", " four"], fail_after=2)
    events = list(_events(_open(url)))
    assert [e.event for e in events] == ["delta", "delta", "error"], events
    err = protocol.from_dict(protocol.ErrorBody, events[-1].json()).error
    assert err.code == "engine_error" and "failed mid-answer" in err.message and "CUDA error" in err.message
    standin.script(["fine"])
    r = requests.post(f"{url}/v1/analyze", json={"task": "report", "image": IMG}, timeout=30)
    assert r.status_code == 200 and r.json()["text"] == "fine"  # still serving


def _wait(cond, timeout_s: float = 10.0) -> bool:
    t_end = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < t_end:
        time.sleep(0.002)
    return cond()


@pytest.mark.parametrize("how", ["delete", "disconnect"])
def test_cancel_closes_the_remote_stream(served, how):
    """The remote server is silent (a long prefill, its own queue) when the cancel comes: the engine does not wait
    for its next chunk, it closes the connection, and the remote server sees that while it waits."""
    url, standin, service = served
    standin.script([" tok", " more"], hold_after=1)
    client = BackendClient(url)
    stream = client.stream(protocol.AnalyzeRequest(task="report", image=IMG))
    it = iter(stream)
    assert next(it) == " tok"
    rid = stream.request_id
    assert rid
    if how == "delete":
        assert client.cancel_request(rid).cancelled
    else:
        stream.close()
        assert _wait(lambda: rid not in service._running)  # the server saw the client go and cancelled
    assert standin.disconnected.wait(10) and standin.sent == 1  # nothing more was written
    assert _wait(lambda: not service.engine_busy)
    if how == "delete":
        with pytest.raises(Exception) as e:
            list(it)
        assert getattr(e.value, "code", None) == "cancelled"
    standin.script(["next"])
    r = requests.post(f"{url}/v1/analyze", json={"task": "report", "image": IMG}, timeout=30)
    assert r.status_code == 200 and r.json()["text"] == "next"


def test_our_chat_completions_relays_the_remote_deltas_with_usage(served):
    """An OpenAI client on our /v1/chat/completions with stream: true, the openai engine behind it: one content
    chunk per remote piece, and usage counted by the remote server."""
    url, standin, _ = served
    pieces = ["Left", " lower", " lobe", "."]
    standin.script(pieces)
    body = {
        "model": "x",
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + IMG}},
                    {"type": "text", "text": "Where?"},
                ],
            }
        ],
    }
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=30) as r:
        assert r.status_code == 200
        lines = [ln[len("data: ") :] for ln in r.iter_lines(decode_unicode=True) if ln]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(c) for c in lines[:-1]]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert [c for c in contents if c] == pieces
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}


def test_a_plain_request_whose_client_goes_away_closes_the_remote_stream(served):
    """Not streamed to our client, still read as a stream from the remote server: the client giving up stops it."""
    url, standin, service = served
    standin.script([" tok", " more"], hold_after=1)
    body = {"task": "report", "image": IMG}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{url}/v1/analyze", json=body, timeout=(5, 0.5))  # the client gives up and closes
    assert _wait(lambda: not service._running)  # the server saw it go and cancelled the request
    assert standin.disconnected.wait(10) and standin.sent == 1
    assert _wait(lambda: not service.engine_busy)
    standin.script(["plain", " answer"])
    r = requests.post(f"{url}/v1/analyze", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["text"] == "plain answer"
    assert r.json()["timings_ms"]["new_tokens"] == 2  # the remote's usage, from its stream


def test_the_request_id_comes_before_the_first_byte_of_the_stream(served):
    """The X-Request-ID header arrives while the remote server has written nothing yet; cancelling with it ends the
    stream with the cancelled error as its first event."""
    url, standin, _ = served
    standin.script([" tok"], hold_after=0)
    r = _open(url)  # returns with the headers; no delta can have been written
    rid = r.headers[protocol.REQUEST_ID_HEADER]
    assert standin.streaming.wait(10)  # the engine's remote stream is open (else there is no disconnect to see)
    assert requests.delete(f"{url}/v1/requests/{rid}", timeout=10).json()["cancelled"] is True
    events = list(_events(r))
    assert [e.event for e in events] == ["error"] and events[0].json()["error"]["code"] == "cancelled"
    assert standin.disconnected.wait(10) and standin.sent == 0


def test_a_remote_server_silent_past_the_read_timeout_mid_stream_did_not_answer():
    """The remote stream started, then nothing for longer than the engine's timeout: the error says the server did
    not answer within it (as before the stream began), not that it broke off its stream."""
    with OpenAIStandIn() as standin:
        engine = OpenAIEngine(OpenAISettings(url=standin.url, family="generic", timeout_s=0.3))
        with ServerThread(engine) as url:
            standin.script([" tok", " more"], hold_after=1)
            r = requests.post(f"{url}/v1/analyze", json={"task": "report", "image": IMG}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_error", r.text
            msg = r.json()["error"]["message"]
            assert "did not answer within 0.3 s" in msg and "broke off" not in msg, msg
            assert standin.disconnected.wait(10)  # the connection was closed
