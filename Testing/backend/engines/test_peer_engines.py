"""Peer engines: family decoders on fixed outputs, the hf engine end to end with tiny models, the openai engine
against our own OpenAI-compatible endpoint and against misbehaving servers on real sockets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
from conftest import b64, blob_image
from hypothesis import given, settings
from hypothesis import strategies as st
from loopback_http import JSONHandler, LoopbackServer
from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib.png import encode_png
from peer_fixtures import peer_model

from backend import families
from backend.engines.builtin import BuiltinEngine
from backend.engines.hf import HFEngine
from backend.engines.openai_engine import OpenAIEngine
from backend.families import ImageGeometry, decode_output
from backend.findings import sanitize_findings
from backend.server_thread import ServerThread, free_port
from backend.settings import HFSettings, OpenAISettings, ServerSettings

# -- decoders on fixed outputs -----------------------------------------------------------------------


def test_medgemma_box_2d_undoes_the_square_padding():
    g = ImageGeometry(width=400, height=200)
    g.pad_left, g.pad_top = families.pad_offsets(400, 200)
    assert (g.pad_left, g.pad_top) == (0, 100)
    raw = (
        "<unused94>thought\nthe heart is on the left<unused95>The right lung is marked.\nFinal Answer: ```json\n"
        '[{"box_2d": [300, 100, 500, 400], "label": "right lung"}]\n```'
    )
    d = decode_output("medgemma", raw, g)
    assert d.text == "The right lung is marked." and "thought" not in d.text
    (f,) = d.findings
    # y: 300/1000*400 - 100 = 20 ; x: 100/1000*400 = 40 ; y1: 500/1000*400 - 100 = 100 ; x1: 160
    assert f.label == "right lung" and np.allclose(f.box, [40, 20, 160, 100])


def test_qwen2_5_vl_absolute_pixels_of_the_resized_image():
    h, w = families.smart_resize(300, 500)
    assert h % 28 == 0 and w % 28 == 0
    g = ImageGeometry(width=500, height=300, model_width=w, model_height=h)
    raw = f'<think>look</think>```json\n[{{"bbox_2d": [0, 0, {w}, {h}], "label": "all"}}, {{"bbox_2d": [{w / 2}, {h / 2}, {w}, {h}]}}]\n```'
    d = decode_output("qwen2_5_vl", raw, g, default_label="nodule")
    assert np.allclose(d.findings[0].box, [0, 0, 500, 300])
    assert np.allclose(d.findings[1].box, [250, 150, 500, 300]) and d.findings[1].label == "nodule"


def test_qwen3_vl_relative_1000_and_malformed_boxes():
    g = ImageGeometry(width=200, height=100)
    raw = (
        'Two findings. [{"bbox_2d": [100, 200, 500, 600], "label": "a"}, {"bbox_2d": [1, 2, 3]}, '
        '{"label": "no box"}, {"bbox_2d": ["x", 0, 1, 1]}] trailing words'
    )
    d = decode_output("qwen3_vl", raw, g)
    assert len(d.findings) == 1 and np.allclose(d.findings[0].box, [20, 20, 100, 60])
    assert d.warnings and "3 object(s)" in d.warnings[0]
    assert decode_output("qwen3_vl", '```json [{"bbox_2d": [1, 2, ', g).warnings  # cut-off JSON: text kept, warned
    assert decode_output("generic", "<think>x</think>plain answer", g).text == "plain answer"


@settings(max_examples=300, deadline=None)
@given(
    family=st.sampled_from(families.FAMILIES),
    raw=st.one_of(
        st.text(max_size=300),
        st.builds(
            lambda objs: "```json\n" + json.dumps(objs) + "\n```",
            st.lists(
                st.dictionaries(
                    st.sampled_from(["box_2d", "bbox_2d", "label", "score"]),
                    st.one_of(
                        st.lists(
                            st.one_of(st.floats(allow_nan=True), st.integers(-5000, 5000), st.text(max_size=2)),
                            max_size=5,
                        ),
                        st.text(max_size=20),
                        st.none(),
                    ),
                ),
                max_size=6,
            ),
        ),
    ),
    w=st.integers(1, 3000),
    h=st.integers(1, 3000),
)
def test_decoders_never_raise_and_boxes_are_valid_after_sanitising(family, raw, w, h):
    g = ImageGeometry(width=w, height=h, model_width=max(28, w // 2), model_height=max(28, h // 2))
    g.pad_left, g.pad_top = families.pad_offsets(w, h)
    d = decode_output(family, raw, g)
    clean, _ = sanitize_findings(d.findings, w, h)
    assert all(protocol.box_is_valid(f.box, w, h) for f in clean)


def test_prompts_per_family_and_task():
    g = ImageGeometry(width=100, height=50)
    g.pad_left, g.pad_top = families.pad_offsets(100, 50)
    p = families.prompt_for("medgemma", "ground", "left lung", None, g)
    assert "box_2d" in p and "Final Answer" in p and "the left lung" in p
    p = families.prompt_for("qwen3_vl", "detect", None, None, g, modality="CT")
    assert "bbox_2d" in p and "abnormality" in p
    p = families.prompt_for("medgemma", "identify", None, (0, 0, 100, 50), g)
    assert "[250, 0, 750, 1000]" in p  # the region in MedGemma's padded 0..1000 y-first coordinates
    with pytest.raises(ValueError):
        families.prompt_for("generic", "detect", None, None, g)


# -- the hf engine end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["medgemma", "qwen2_5_vl", "qwen3_vl"])
def hf_server(request):
    engine = HFEngine(HFSettings(model=str(peer_model(request.param)), family=request.param, device="cpu"))
    with ServerThread(engine) as url:
        yield request.param, url


def test_hf_engine_over_http(hf_server):
    family, url = hf_server
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["engine"] == "hf" and family in health["model"]
    assert set(health["tasks"]) == {"report", "vqa", "detect", "ground", "identify"}
    png = b64(encode_png(blob_image(size=96)))
    for body in (
        {"task": "report"},
        {"task": "vqa", "question": "Is there a nodule?"},
        {"task": "detect", "modality": "CT"},
        {"task": "ground", "question": "the bright spot"},
        {"task": "identify", "region": [10, 10, 50, 40]},
    ):
        r = requests.post(f"{url}/v1/analyze", json={**body, "image": png, "max_new_tokens": 12}, timeout=120)
        assert r.status_code == 200, r.text
        resp = protocol.from_dict(protocol.AnalyzeResponse, r.json())
        assert resp.engine == "hf" and resp.timings_ms["new_tokens"] >= 1
        assert all(protocol.box_is_valid(f.box, 96, 96) for f in resp.findings)


def test_hf_engine_batches_like_single_requests(hf_server):
    """One left-padded generate() for images of different sizes and prompts gives each row's single-request answer."""
    _family, url = hf_server
    assert requests.get(f"{url}/health", timeout=10).json()["max_batch"] == 4
    items = [
        {"task": "report", "image": b64(encode_png(blob_image(size=96)[:64]))},
        {
            "task": "vqa",
            "question": "Is there a nodule in the left lower lobe?",
            "max_new_tokens": 5,
            "image": b64(encode_png(blob_image(size=128)[:, :64])),
        },
        {"task": "detect", "image": b64(encode_png(blob_image(size=80)))},
    ]
    items = [{"max_new_tokens": 10, **it} for it in items]
    single = [requests.post(f"{url}/v1/analyze", json=it, timeout=120).json() for it in items]
    r = requests.post(f"{url}/v1/analyze/batch", json={"items": items}, timeout=120)
    assert r.status_code == 200, r.text
    batch = r.json()["results"]
    assert [b["text"] for b in batch] == [s["text"] for s in single]
    assert [b["findings"] for b in batch] == [s["findings"] for s in single]
    assert batch[1]["timings_ms"]["new_tokens"] <= 5  # each row keeps its own max_new_tokens


def test_hf_engine_missing_folder_fails_at_start():
    with pytest.raises(Exception, match="no such folder"):
        HFEngine(HFSettings(model="/nonexistent/model", family="medgemma")).load()


# -- the openai engine ---------------------------------------------------------------------------------


def test_openai_engine_through_our_own_endpoint():
    """Two real servers: the builtin engine behind our OpenAI-compatible endpoint, and an openai engine that uses it."""
    with ServerThread(BuiltinEngine()) as inner:
        models = requests.get(f"{inner}/v1/models", timeout=10).json()
        assert models["data"][0]["id"].startswith("builtin")
        with ServerThread(OpenAIEngine(OpenAISettings(url=f"{inner}/v1", family="generic"))) as outer:
            health = requests.get(f"{outer}/health", timeout=10).json()
            assert health["engine"] == "openai" and "builtin" in health["model"]
            png = b64(encode_png(blob_image()))
            r = requests.post(f"{outer}/v1/analyze", json={"task": "report", "image": png}, timeout=60)
            assert r.status_code == 200
            assert "not a diagnosis" in r.json()["text"]  # the builtin engine's words, through two servers
            r = requests.post(f"{outer}/v1/analyze", json={"task": "detect", "image": png}, timeout=60)
            assert r.status_code == 501 and "--family" in r.json()["error"]["message"]


def test_our_chat_endpoint_returns_boxes_in_qwen3_convention():
    from fault_engines import TwoBoxEngine

    with ServerThread(TwoBoxEngine()) as url:
        png = encode_png(blob_image())
        body = {
            "model": "x",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png)}},
                        {"type": "text", "text": "[detect]"},
                    ],
                }
            ],
        }
        r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200
        msg = r.json()["choices"][0]["message"]
        assert msg["role"] == "assistant" and len(msg["findings"]) == 2
        d = decode_output("qwen3_vl", msg["content"], ImageGeometry(width=256, height=256))
        for a, b in zip(
            sorted(d.findings, key=lambda f: f.box[0]), sorted(msg["findings"], key=lambda f: f["box"][0]), strict=True
        ):
            assert np.allclose(a.box, b["box"], atol=1.5)  # 0..1000 rounding
        with requests.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60, stream=True) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line[len("data: ") :] for line in r.iter_lines(decode_unicode=True) if line]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]
        r = requests.post(
            f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10
        )
        assert r.status_code == 400 and "image" in r.json()["error"]["message"]


class _FakeVLLM(JSONHandler):
    """A stand-in for a remote vLLM (which cannot run here): the real OpenAI protocol on a real socket."""

    mode = "ok"
    content: str | None = ""
    finish_reason = "stop"

    def do_GET(self):
        self.send_json(200, {"object": "list", "data": [{"id": "google/medgemma-1.5-4b-it", "object": "model"}]})

    def do_POST(self):
        body = self.read_json()
        type(self).last_body = body
        if self.mode == "500":
            self.send_json(500, {"error": {"message": "CUDA error"}})
        elif self.mode == "garbage":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>not json")
        elif self.mode == "slow":
            import time

            time.sleep(3)
            self.send_json(200, {})
        else:
            self.send_json(
                200,
                {
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": self.finish_reason,
                            "message": {"role": "assistant", "content": self.content},
                        }
                    ]
                },
            )


@pytest.fixture
def fake_vllm():
    _FakeVLLM.mode, _FakeVLLM.content, _FakeVLLM.finish_reason = "ok", "", "stop"
    with LoopbackServer(_FakeVLLM) as remote:
        yield remote.server, remote.url


def test_openai_engine_medgemma_boxes_and_request_shape(fake_vllm):
    _server, url = fake_vllm
    _FakeVLLM.mode = "ok"
    _FakeVLLM.content = 'Final Answer: ```json [{"box_2d": [250, 0, 750, 500], "label": "left lung"}] ```'
    with ServerThread(OpenAIEngine(OpenAISettings(url=url, family="medgemma"))) as outer:
        png = b64(encode_png(blob_image(size=200)[:100]))  # 200 wide x 100 tall: padded by 50 rows top and bottom
        r = requests.post(
            f"{outer}/v1/analyze", json={"task": "ground", "question": "left lung", "image": png}, timeout=60
        )
        assert r.status_code == 200, r.text
        (f,) = r.json()["findings"]
        assert f["label"] == "left lung" and np.allclose(f["box"], [0, 0, 100, 100])
    sent = _FakeVLLM.last_body
    assert sent["model"] == "google/medgemma-1.5-4b-it" and sent["temperature"] == 0.0
    parts = sent["messages"][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,") and "box_2d" in parts[1]["text"]


def test_openai_engine_cut_or_empty_answers_are_warnings(fake_vllm):
    _server, url = fake_vllm
    _FakeVLLM.content, _FakeVLLM.finish_reason = (
        '```json [{"bbox_2d": [0, 0, 500, 500], "label": "a"}, {"bbox',
        "length",
    )
    with ServerThread(OpenAIEngine(OpenAISettings(url=url, family="qwen3_vl"))) as outer:
        png = b64(encode_png(blob_image(size=100)))
        r = requests.post(
            f"{outer}/v1/analyze", json={"task": "detect", "image": png, "max_new_tokens": 40}, timeout=60
        )
        assert r.status_code == 200, r.text
        out = r.json()
        assert any("cut at max_tokens (40)" in w for w in out["warnings"]), out
        (f,) = out["findings"]  # the complete object before the cut is kept
        assert f["label"] == "a" and np.allclose(f["box"], [0, 0, 50, 50])
        _FakeVLLM.content = None  # a reasoning parser that kept everything out of content
        r = requests.post(f"{outer}/v1/analyze", json={"task": "report", "image": png}, timeout=60)
        assert r.status_code == 200, r.text
        assert any("empty answer" in w for w in r.json()["warnings"]) and r.json()["findings"] == []


def test_smart_resize_known_sizes():
    assert families.smart_resize(1024, 1024) == (1036, 1036)  # Qwen2.5-VL's default bounds: rounded to 28s
    assert families.smart_resize(1024, 1024, max_pixels=families.QWEN_SEND_MAX_PIXELS) == (980, 980)
    assert families.smart_resize(20, 30) == (56, 84)  # below min_pixels: scaled up
    h, w = families.smart_resize(800, 1600, max_pixels=families.QWEN_SEND_MAX_PIXELS)
    assert families.smart_resize(h, w) == (h, w)  # what the openai engine sends, the server leaves as it is


def test_openai_engine_qwen2_5_vl_sends_the_resized_image_and_maps_boxes_back(fake_vllm):
    import base64
    import io

    from PIL import Image

    _server, url = fake_vllm
    _FakeVLLM.mode = "ok"
    mh, mw = families.smart_resize(800, 1600, max_pixels=families.QWEN_SEND_MAX_PIXELS)
    _FakeVLLM.content = f'```json [{{"bbox_2d": [{mw / 4}, 0, {mw / 2}, {mh / 2}], "label": "nodule"}}] ```'
    with ServerThread(OpenAIEngine(OpenAISettings(url=url, family="qwen2_5_vl"))) as outer:
        img = np.zeros((800, 1600), np.uint8)
        r = requests.post(f"{outer}/v1/analyze", json={"task": "detect", "image": b64(encode_png(img))}, timeout=60)
        assert r.status_code == 200, r.text
        (f,) = r.json()["findings"]
        assert np.allclose(f["box"], [400, 0, 800, 400], atol=1e-6)
    data_uri = _FakeVLLM.last_body["messages"][0]["content"][0]["image_url"]["url"]
    sent = Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1])))
    assert sent.size == (mw, mh) and mw % 28 == 0 and mh % 28 == 0 and mw * mh <= families.QWEN_SEND_MAX_PIXELS


@pytest.mark.parametrize("mode,words", [("500", "answered 500"), ("garbage", "not JSON"), ("slow", "did not answer")])
def test_openai_engine_failures_are_clear_503s(fake_vllm, mode, words):
    _server, url = fake_vllm
    _FakeVLLM.mode = mode
    engine = OpenAIEngine(OpenAISettings(url=url, family="qwen3_vl", timeout_s=1.0))
    with ServerThread(engine, ServerSettings(request_timeout_s=30)) as outer:
        png = b64(encode_png(blob_image()))
        r = requests.post(f"{outer}/v1/analyze", json={"task": "report", "image": png}, timeout=60)
        assert r.status_code == 503 and words in r.json()["error"]["message"], r.text
        assert requests.get(f"{outer}/health", timeout=10).status_code == 200


def test_openai_engine_server_down_fails_at_start():
    engine = OpenAIEngine(OpenAISettings(url=f"http://127.0.0.1:{free_port()}/v1", family="generic"))
    with pytest.raises(Exception, match="is it running"):
        engine.load()
