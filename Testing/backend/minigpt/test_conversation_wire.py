"""Conversations and streaming on the wire, with the tiny offline MiniGPT-Med behind the real uvicorn server:
POST /v1/images, image_id, history (the follow-up's prompt length against an independent construction of the
template), the vision encoder skipped on a follow-up, eviction with the client's transparent re-upload, history
limits, and a streamed answer whose deltas add up to the final text."""

from __future__ import annotations

import json

import pytest
import requests
from conftest import b64
from minigpt_fixtures import _training_images, tiny_files
from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib.client import BackendClient, BackendError, run_calls
from MiniGPTMedSlicerLib.conversation import Conversation
from MiniGPTMedSlicerLib.png import encode_png
from MiniGPTMedSlicerLib.sse import SseParser

from backend.engines.minigptmed import MiniGPTMedEngine
from backend.server_thread import ServerThread
from backend.settings import MiniGPTMedSettings, ServerSettings


class _CountingEncoder:
    def __init__(self, engine: MiniGPTMedEngine):
        self.inner = engine.model.encode_images
        self.images = 0
        engine.model.encode_images = self

    def __call__(self, pixels):
        self.images += int(pixels.shape[0])
        return self.inner(pixels)


@pytest.fixture(scope="module")
def served():
    t = tiny_files()
    e = MiniGPTMedEngine(
        MiniGPTMedSettings(
            eva=str(t.eva), llama=str(t.llama), checkpoint=str(t.checkpoint), model_config=str(t.model_config)
        )
    )
    e.load()
    enc = _CountingEncoder(e)
    settings = ServerSettings(image_store_entries=2, max_history_turns=3, max_history_chars=400)
    with ServerThread(e, settings) as url:
        yield url, e, enc


IMGS = [b64(encode_png(a)) for a in _training_images()]


def _post(url, path, body, status=200):
    r = requests.post(f"{url}{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def test_upload_then_follow_up_with_history(served):
    url, engine, enc = served
    stored = protocol.from_dict(protocol.StoredImage, _post(url, "/v1/images", {"image": IMGS[0]}))
    h, w = _training_images()[0].shape
    assert (stored.width, stored.height) == (w, h) and len(stored.image_id) == 64
    again = _post(url, "/v1/images", {"image": IMGS[0]})
    assert again["image_id"] == stored.image_id  # a content hash
    before = enc.images
    first = _post(url, "/v1/analyze", {"task": "vqa", "question": "is there a mass?", "image_id": stored.image_id})
    history = [{"question": "is there a mass?", "answer": first["raw_output"], "task": "vqa"}]
    second = _post(
        url, "/v1/analyze", {"task": "ground", "question": "nodule", "image_id": stored.image_id, "history": history}
    )
    assert enc.images - before <= 1  # the follow-up skipped the vision encoder
    assert second["timings_ms"]["vision_cached"] == 1.0
    # the follow-up's prompt, built here from the template: [BOS, BOS, "[INST] <Img>"], the image, then
    # "</Img> {q1} [/INST]{a1}", a literal <s> (BOS), "[INST] {q2} [/INST]"
    sp = engine.tokenizer.sp
    n = 2 + len(sp.encode("[INST] <Img>")) + engine.cfg.image_tokens
    n += len(sp.encode(f"</Img> [vqa] is there a mass? [/INST]{first['raw_output']}")) + 1
    n += len(sp.encode("[INST] [refer] nodule [/INST]"))
    assert second["timings_ms"]["prompt_tokens"] == n
    single = _post(url, "/v1/analyze", {"task": "ground", "question": "nodule", "image_id": stored.image_id})
    assert single["timings_ms"]["prompt_tokens"] < n


def test_unknown_and_evicted_ids_and_the_client_re_uploads(served):
    url, _, _ = served
    body = {"task": "report", "image_id": "0" * 64}
    err = _post(url, "/v1/analyze", body, 404)["error"]
    assert err["code"] == "image_not_found"
    client = BackendClient(url)
    conv = Conversation(image=IMGS[0])
    first = run_calls(conv.ask(client, protocol.AnalyzeRequest(task="report", image=IMGS[0])), client)
    old = conv.image_id
    for k in (1, 2):  # the store holds 2: image 0 is evicted
        client.upload(IMGS[k])
    gone = _post(url, "/v1/analyze", {"task": "report", "image_id": old}, 410)["error"]
    assert gone["code"] == "image_expired"
    follow = run_calls(conv.ask(client, protocol.AnalyzeRequest(task="vqa", question="is there a mass?")), client)
    assert conv.uploads == 2 and conv.image_id == old and len(conv.turns) == 2
    assert follow.text and first.text == conv.turns[0].text
    restored = Conversation.turns_from_json(conv.to_json())
    assert restored == conv.turns


def test_history_limits_and_the_server_keeps_serving(served):
    url, _, _ = served
    turn = {"question": "q", "answer": "a"}
    e = _post(url, "/v1/analyze", {"task": "report", "image": IMGS[0], "history": [turn] * 4}, 400)["error"]
    assert e["code"] == "bad_request" and "limit is 3" in e["message"]
    big = [{"question": "q" * 150, "answer": "a" * 150}, {"question": "q", "answer": "a" * 100}]
    e = _post(url, "/v1/analyze", {"task": "report", "image": IMGS[0], "history": big}, 413)["error"]
    assert e["code"] == "too_large" and "400" in e["message"]
    e = _post(url, "/v1/analyze", {"task": "report", "image": IMGS[0], "image_id": "x"}, 400)["error"]
    assert "not both" in e["message"]
    bad = {"task": "report", "image": IMGS[0], "history": [{"question": "q", "answer": "a", "task": "nope"}]}
    assert _post(url, "/v1/analyze", bad, 422)["error"]["code"] == "invalid_schema"
    assert _post(url, "/v1/analyze", {"task": "report", "image": IMGS[0], "history": [turn]})["text"]


def test_stream_deltas_before_done_add_up_to_the_text(served):
    url, _, _ = served
    r = requests.post(
        f"{url}/v1/analyze", json={"task": "report", "image": IMGS[1], "stream": True}, stream=True, timeout=60
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers[protocol.REQUEST_ID_HEADER]
    parser, events = SseParser(), []
    for chunk in r.iter_content(chunk_size=None):
        events += parser.feed(chunk)
    names = [e.event for e in events]
    assert names[-1] == "done" and names.count("done") == 1 and set(names[:-1]) == {"delta"}
    assert len(names) >= 3  # at least two deltas before the final event
    done = protocol.from_dict(protocol.AnalyzeResponse, events[-1].json())
    text = "".join(json.loads(e.data)["text"] for e in events[:-1])
    assert text == done.text == done.raw_output and len(text.split()) >= 2
    plain = _post(url, "/v1/analyze", {"task": "report", "image": IMGS[1]})
    assert plain["text"] == done.text
    # the client's iterator gives the same deltas and the same final response
    stream = BackendClient(url).stream(protocol.AnalyzeRequest(task="report", image=IMGS[1]))
    pieces = list(stream)
    assert len(pieces) >= 2 and "".join(pieces) == done.text and stream.response is not None
    assert stream.response.text == done.text and stream.request_id


def test_stream_errors_before_it_starts_are_plain_json(served):
    url, _, _ = served
    r = requests.post(f"{url}/v1/analyze", json={"task": "vqa", "image": IMGS[0], "stream": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    with pytest.raises(BackendError) as e:
        list(BackendClient(url).stream(protocol.AnalyzeRequest(task="report", image_id="f" * 64)))
    assert e.value.code == "image_not_found" and e.value.status == 404


def test_chat_completions_multi_turn_and_per_token_stream(served):
    url, _, _ = served
    uri = "data:image/png;base64," + IMGS[1]
    first = _post(url, "/v1/analyze", {"task": "vqa", "question": "is there a mass?", "image": IMGS[1]})
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": uri}},
                {"type": "text", "text": "[vqa] is there a mass?"},
            ],
        },
        {"role": "assistant", "content": first["raw_output"]},
        {"role": "user", "content": "Describe this image in detail"},
    ]
    plain = _post(url, "/v1/chat/completions", {"messages": messages, "task": "report"})
    hist = [{"question": "is there a mass?", "answer": first["raw_output"], "task": "vqa"}]
    native = _post(url, "/v1/analyze", {"task": "report", "image": IMGS[1], "history": hist})
    assert plain["choices"][0]["message"]["content"] == native["text"]
    assert plain["usage"]["prompt_tokens"] == native["timings_ms"]["prompt_tokens"]
    r = requests.post(
        f"{url}/v1/chat/completions",
        json={"messages": messages, "task": "report", "stream": True},
        stream=True,
        timeout=60,
    )
    events = []
    parser = SseParser()
    for chunk in r.iter_content(chunk_size=None):
        events += parser.feed(chunk)
    assert events[-1].data == "[DONE]"
    objs = [json.loads(e.data) for e in events[:-1]]
    content = [o["choices"][0]["delta"].get("content") for o in objs if o["choices"]]
    assert len([c for c in content if c]) >= 2 and "".join(c or "" for c in content) == native["text"]
    usage = objs[-1]["usage"]
    assert (
        usage["completion_tokens"] == native["timings_ms"]["new_tokens"]
        and usage["total_tokens"] > usage["completion_tokens"]
    )
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}] * 2}]
    assert "one per conversation" in _post(url, "/v1/chat/completions", {"messages": two}, 400)["error"]["message"]


def test_openai_engine_sends_the_turns_as_chat_messages(served):
    from backend.engines.openai_engine import OpenAIEngine
    from backend.settings import OpenAISettings

    url, engine, _ = served
    seen: list = []
    inner = engine.analyze_batch

    def recording(inputs, stop):  # what the inner engine is asked: the turns it got
        seen.extend([(i.history, i.question) for i in inputs])
        return inner(inputs, stop)

    engine.analyze_batch = recording
    first = _post(url, "/v1/analyze", {"task": "vqa", "question": "is there a mass?", "image": IMGS[2]})
    hist = [{"question": "is there a mass?", "answer": first["raw_output"] + " really", "task": "vqa"}]
    body = {"task": "vqa", "question": "is there a mass?", "image": IMGS[2], "history": hist}
    native = _post(url, "/v1/analyze", body)
    with ServerThread(OpenAIEngine(OpenAISettings(url=url + "/v1", family="generic"))) as outer:
        relayed = _post(outer, "/v1/analyze", body)
        single = _post(outer, "/v1/analyze", {**body, "history": None})
    del engine.analyze_batch
    assert relayed["text"] == native["text"]
    assert single["text"] == first["text"]
    assert seen[2] == seen[1] and seen[1][0][0].answer == first["raw_output"] + " really" and seen[3][0] == ()
