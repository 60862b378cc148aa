"""MiniGPT-Med with its LLM on vLLM: ``convert --for-vllm`` writes a plain LLaMA folder (LoRA merged), and
``--vllm URL`` sends the embedding sequence as ``prompt_embeds`` to a stand-in that speaks vLLM's format on a real
socket and answers with transformers' greedy generate on that folder. The answers must equal the local LLaMA's."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import requests
import torch
from conftest import b64
from minigpt_fixtures import _training_images, tiny_files
from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib.client import BackendClient
from MiniGPTMedSlicerLib.png import encode_png
from MiniGPTMedSlicerLib.sse import SseParser
from safetensors.torch import load_file
from vllm_standin import VLLMStandIn

from backend.cli import main
from backend.engines.base import AnalysisInput, DecodedImage, StopToken
from backend.engines.minigptmed import MiniGPTMedEngine, _Item
from backend.server_thread import ServerThread
from backend.settings import MiniGPTMedSettings

IMG = _training_images()[0]  # 96 x 128 gray slice
H, W = IMG.shape
REQUESTS = {
    "report": {"task": "report"},
    "vqa": {"task": "vqa", "question": "is there a mass?"},
    "detect": {"task": "detect", "question": "tumor", "modality": "CT"},
    "ground": {"task": "ground", "question": "nodule"},
    "identify": {"task": "identify", "region": [0.25 * W, 0.25 * H, 0.5 * W, 0.5 * H]},
}


@pytest.fixture(scope="module")
def tiny():
    return tiny_files()


def _settings(tiny, **kw) -> MiniGPTMedSettings:
    return MiniGPTMedSettings(
        eva=str(tiny.eva),
        llama=str(tiny.llama),
        checkpoint=str(tiny.checkpoint),
        model_config=str(tiny.model_config),
        **kw,
    )


@pytest.fixture(scope="module")
def vllm_folder(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "minigptmed-llm"
    args = ["--llama", str(tiny.llama), "--checkpoint", str(tiny.checkpoint), "--model-config", str(tiny.model_config)]
    assert main(["convert", "--for-vllm", str(out), *args]) == 0
    return out


@pytest.fixture(scope="module")
def local():
    e = MiniGPTMedEngine(_settings(tiny_files()))
    e.load()
    return e


def test_convert_for_vllm_writes_a_plain_llama_folder(tiny, vllm_folder, capsys):
    from transformers import GenerationConfig, LlamaForCausalLM

    names = {p.name for p in vllm_folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"} <= names
    assert any(n.endswith(".safetensors") for n in names) and not any("vision" in n or "lora" in n for n in names)
    assert (vllm_folder / "tokenizer.model").read_bytes() == (tiny.llama / "tokenizer.model").read_bytes()
    assert json.loads((vllm_folder / "config.json").read_text())["model_type"] == "llama"
    gc = json.loads((vllm_folder / "generation_config.json").read_text())
    assert gc["do_sample"] is False and "temperature" not in gc and "top_p" not in gc  # the source asked for sampling
    assert GenerationConfig.from_pretrained(str(vllm_folder)).do_sample is False
    llm, info = LlamaForCausalLM.from_pretrained(str(vllm_folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # the LoRA is merged: W' = W + alpha/r * B @ A, from the original files, computed here
    base = load_file(str(tiny.llama / "model.safetensors"))
    ckpt = torch.load(tiny.checkpoint, weights_only=True)["model"]
    pre = "llama_model.base_model.model.model.layers.1.self_attn.v_proj."
    want = base["model.layers.1.self_attn.v_proj.weight"] + 16 / 64 * (
        ckpt[pre + "lora_B.weight"] @ ckpt[pre + "lora_A.weight"]
    )
    got = llm.model.layers[1].self_attn.v_proj.weight.detach()
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(
        got, base["model.layers.1.self_attn.v_proj.weight"]
    )
    assert torch.equal(llm.model.layers[0].mlp.up_proj.weight, base["model.layers.0.mlp.up_proj.weight"])
    # the folder is never overwritten, and a missing input is one line and exit 2
    before = sorted((p.name, p.stat().st_size) for p in vllm_folder.iterdir())
    capsys.readouterr()
    assert main(["convert", "--for-vllm", str(vllm_folder), "--llama", str(tiny.llama), *_ckpt(tiny)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and len(err.splitlines()) == 1
    assert sorted((p.name, p.stat().st_size) for p in vllm_folder.iterdir()) == before
    assert main(["convert", "--for-vllm", str(vllm_folder.parent / "x"), "--llama", str(tiny.llama)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert not (vllm_folder.parent / "x").exists()


def _ckpt(tiny) -> list[str]:
    return ["--checkpoint", str(tiny.checkpoint), "--model-config", str(tiny.model_config)]


def test_minigptmed_on_vllm_answers_as_the_local_llama(tiny, vllm_folder, local):
    from backend.minigpt.preprocess import normalize, resized_rgb

    png = b64(encode_png(IMG))
    with VLLMStandIn(vllm_folder) as standin:
        remote = MiniGPTMedEngine(_settings(tiny, vllm_url=standin.url))
        with ServerThread(remote) as url_remote, ServerThread(local) as url_local:
            health = requests.get(f"{url_remote}/health", timeout=10).json()
            assert "vLLM" in health["device"] and health["engine"] == "minigptmed"
            assert remote.model.llm.__class__.__name__ == "EmbeddingTableLLM"  # no decoder layers here
            for task, body in REQUESTS.items():
                a = requests.post(f"{url_remote}/v1/analyze", json={**body, "image": png}, timeout=60)
                b = requests.post(f"{url_local}/v1/analyze", json={**body, "image": png}, timeout=60)
                assert a.status_code == 200, a.text
                ja, jb = a.json(), b.json()
                assert (ja["text"], ja["findings"], ja["raw_output"]) == (jb["text"], jb["findings"], jb["raw_output"])
                assert ja["warnings"] == jb["warnings"], task
            # the sequence the local LLaMA gets, from the local engine: template, double BOS, the image spliced in
            rgb = np.repeat(IMG[:, :, None], 3, axis=2)
            with torch.inference_mode():
                image = local.model.encode_images(normalize(resized_rgb(rgb, 448))[None])[0]
                item = _Item(
                    AnalysisInput(task="detect", image=DecodedImage(IMG, "PNG")), "[detection] tumor", "", "k", 20, None
                )
                want = local._embed_prompt(item, image)
        detect = standin.received[2]  # the third request
        body = standin.bodies[2]
    assert detect.dtype == torch.float32 and detect.shape == want.shape and torch.equal(detect, want)
    table = load_file(str(tiny.llama / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(detect[0], table[1]) and torch.equal(detect[1], table[1])  # [BOS, BOS, ...
    n0 = next(i for i in range(2, detect.shape[0]) if torch.equal(detect[i : i + 256], image))
    seg0, seg1 = local.tokenizer.prompt_segments("<s>[INST] <Img><ImageHere></Img> [detection] tumor [/INST]")
    assert seg0[:2] == [1, 1] and n0 == len(seg0) and detect.shape[0] == n0 + 256 + len(seg1)
    assert "prompt" not in body and body["temperature"] == 0.0 and body["return_token_ids"] is True
    assert body["max_tokens"] == 100 and body["model"] == standin.served_name


def test_vllm_failures_are_503_and_the_backend_keeps_serving(tiny, vllm_folder):
    png = b64(encode_png(IMG))
    req = {"task": "vqa", "question": "is there a mass?", "image": png}
    with (
        VLLMStandIn(vllm_folder) as standin,
        ServerThread(MiniGPTMedEngine(_settings(tiny, vllm_url=standin.url))) as url,
    ):
        standin.fail_with = (400, {"error": {"message": "prompt_embeds hidden_size 63 does not match", "code": 400}})
        r = requests.post(f"{url}/v1/analyze", json=req, timeout=60)
        assert r.status_code == 503 and "answered 400: prompt_embeds hidden_size" in r.json()["error"]["message"]
        standin.fail_with = (200, {"choices": [{"index": 0, "text": "yes", "finish_reason": "stop"}]})
        r = requests.post(f"{url}/v1/analyze", json=req, timeout=60)
        assert r.status_code == 503 and "vLLM >= 0.10.2" in r.json()["error"]["message"]
        standin.fail_with = None
        r = requests.post(f"{url}/v1/analyze", json=req, timeout=60)
        assert r.status_code == 200 and r.json()["text"] == "yes"


REPORT_WITH_FOUR_NUMBERS = "Two nodules of 4 mm and 6 mm, 12 and 25 mm from the pleura."


def test_four_numbers_become_a_box_only_where_the_model_gave_a_box(tiny, vllm_folder):
    """The issue's real bug: MiniGPT-Med's bare four-integer fallback turned a report holding exactly four integers
    into a 'tumor' box. Now only a ground/detect answer that is nothing but a box is read as one; the real engine runs,
    the stand-in on a real socket writes the scripted answer."""
    side = 512
    png = b64(encode_png(np.full((side, side), 90, np.uint8)))
    with VLLMStandIn(vllm_folder) as standin:
        with ServerThread(MiniGPTMedEngine(_settings(tiny, vllm_url=standin.url))) as url:

            def ask(script: str, body: dict) -> dict:
                standin.script = script
                r = requests.post(f"{url}/v1/analyze", json={**body, "image": png}, timeout=60)
                assert r.status_code == 200, r.text
                return r.json()

            for task in ("report", "vqa", "detect", "ground"):
                out = ask(REPORT_WITH_FOUR_NUMBERS, REQUESTS[task])
                assert out["findings"] == [], task
                assert out["text"] == REPORT_WITH_FOUR_NUMBERS
            for task in ("report", "vqa"):  # a bare answer of four numbers is still not a box outside ground/detect
                assert ask("10 20 30 40", REQUESTS[task])["findings"] == []
            for answer in ("10 20 30 40", "[10, 20, 30, 40]"):  # the demo's refer mode: nothing but a box
                got = ask(answer, REQUESTS["ground"])["findings"]
                assert [f["box"] for f in got] == [pytest.approx([51.2, 102.4, 153.6, 204.8])]
            assert ask("nodule at 10 20 30 40", REQUESTS["ground"])["findings"] == []


#: width, height: a portrait, a landscape and a square image (MiniGPT-Med squashes each to 448 x 448)
SHAPES = {"portrait": (90, 150), "landscape": (170, 100), "square": (120, 120)}


def _grid_to_pixels(g, w: int, h: int) -> list[float]:
    """MiniGPT-Med's box convention, written out here: integers on 0..100 of the image's width and height."""
    return [g[0] * w / 100, g[1] * h / 100, g[2] * w / 100, g[3] * h / 100]


def test_boxes_land_on_each_images_grid_locally_and_on_vllm(tiny, vllm_folder, local):
    """Issue 13 §2 for MiniGPT-Med, through both of its engines over HTTP: the local LLaMA (the tiny model trained to
    answer ``[detection] tumor`` with ``{<10><20><30><40>}``) and the vLLM route (the stand-in writes a scripted
    two-box answer); expected pixels from the 0..100 grid of each image's own width and height."""
    script = "<p>mass</p> {<12><34><56><78>}<delim>{<3><7><41><29>}"
    with VLLMStandIn(vllm_folder) as standin:
        standin.script = script
        remote = MiniGPTMedEngine(_settings(tiny, vllm_url=standin.url))
        with ServerThread(local) as url_local, ServerThread(remote) as url_remote:
            for shape, (w, h) in SHAPES.items():
                a = np.add.outer(np.arange(h), np.arange(w)).astype(np.uint8)
                png = b64(encode_png(a))
                r = requests.post(
                    f"{url_local}/v1/analyze", json={"task": "detect", "question": "tumor", "image": png}, timeout=60
                )
                assert r.status_code == 200, r.text
                out = r.json()
                assert out["raw_output"] == "<p>tumor</p> {<10><20><30><40>}", shape  # what the tiny model learnt
                assert [f["label"] for f in out["findings"]] == ["tumor"]
                assert np.allclose(out["findings"][0]["box"], _grid_to_pixels((10, 20, 30, 40), w, h), atol=1.0)
                r = requests.post(
                    f"{url_remote}/v1/analyze", json={"task": "detect", "question": "mass", "image": png}, timeout=60
                )
                assert r.status_code == 200, r.text
                out = r.json()
                assert out["raw_output"] == script and [f["label"] for f in out["findings"]] == ["mass", "mass"]
                for f, g in zip(out["findings"], [(12, 34, 56, 78), (3, 7, 41, 29)], strict=True):
                    assert np.allclose(f["box"], _grid_to_pixels(g, w, h), atol=1.0), (shape, f["box"])


# -- streaming and cancel (issue 16 §2/§3 on the vLLM route) -------------------------------------------------------


@pytest.fixture(scope="module")
def streamed(tiny, vllm_folder):
    """The tiny MiniGPT-Med with --vllm at the stand-in, behind the real uvicorn server (two rows per batch)."""
    with VLLMStandIn(vllm_folder) as standin:
        engine = MiniGPTMedEngine(_settings(tiny, vllm_url=standin.url, max_batch=2))
        st = ServerThread(engine)
        with st as url:
            yield url, standin, engine, st.app.state.service


def _wait(cond, timeout_s: float = 10.0) -> bool:
    t_end = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < t_end:
        time.sleep(0.002)
    return cond()


#: the stand-in's first two tokens of a scripted answer: SentencePiece's "▁" (no text yet), then a first letter
FIRST_TOKENS = 2


def _first_piece(standin) -> str:
    """What the stand-in's first FIRST_TOKENS tokens of its scripted answer decode to."""
    piece = standin.sp.decode(standin.sp.encode(standin.script)[:FIRST_TOKENS])
    assert piece
    return piece


def _sse(r):
    parser = SseParser()
    for chunk in r.iter_content(chunk_size=None):
        yield from parser.feed(chunk)


def test_the_vllm_route_streams_its_answer_and_parses_boxes_from_the_whole_text(streamed):
    url, standin, _, _ = streamed
    w, h = 150, 90  # not square: the 0..100 grid maps to each side on its own
    png = b64(encode_png(np.add.outer(np.arange(h), np.arange(w)).astype(np.uint8)))
    script = "<p>mass</p> {<12><34><56><78>} and a smaller one"
    standin.script = script
    standin.hold(2)  # the stand-in stops after two tokens until the test has seen their deltas
    body = {"task": "detect", "question": "mass", "image": png}
    deltas, final = [], None
    with requests.post(f"{url}/v1/analyze", json={**body, "stream": True}, stream=True, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        for ev in _sse(r):
            if ev.event == "delta":
                deltas.append(ev.json()["text"])
                if len(deltas) == 2:
                    assert standin.sent == 2  # the rest of the answer is not written yet
                    standin.release.set()
            else:
                assert ev.event == "done", ev
                final = ev.json()
    assert final is not None and len(deltas) >= 3
    assert "".join(deltas) == final["raw_output"] == script
    assert [f["label"] for f in final["findings"]] == ["mass"]
    assert np.allclose(final["findings"][0]["box"], _grid_to_pixels((12, 34, 56, 78), w, h), atol=1.0)
    sent = standin.bodies[-1]
    assert sent["stream"] is True and sent["return_token_ids"] is True
    # the same request not streamed: the remote answer is still read as a stream, the answer is the same
    standin.hold(None)
    r = requests.post(f"{url}/v1/analyze", json=body, timeout=30)
    assert r.status_code == 200, r.text
    plain = r.json()
    for key in ("text", "findings", "raw_output", "warnings"):
        assert plain[key] == final[key], key
    assert standin.bodies[-1]["stream"] is True
    # a report: the deltas add up to the final text
    standin.script = "The lungs are clear. No pleural effusion."
    with requests.post(
        f"{url}/v1/analyze", json={"task": "report", "image": png, "stream": True}, stream=True, timeout=30
    ) as r:
        events = list(_sse(r))
    deltas = [e.json()["text"] for e in events if e.event == "delta"]
    assert events[-1].event == "done" and len(deltas) >= 2
    assert "".join(deltas) == events[-1].json()["text"] == standin.script


def test_delete_mid_stream_closes_the_vllm_stream(streamed):
    """The stand-in is silent after the first letter (its queue, a long decode) when the cancel comes: the engine closes the
    connection without waiting for the next chunk, the stand-in sees it, and the next request is served."""
    url, standin, _, service = streamed
    standin.script = "The lungs are clear. No pleural effusion."
    standin.hold(FIRST_TOKENS)
    client = BackendClient(url)
    stream = client.stream(protocol.AnalyzeRequest(task="report", image=b64(encode_png(IMG))))
    it = iter(stream)
    assert next(it) == _first_piece(standin)
    assert client.cancel_request(stream.request_id).cancelled
    assert standin.disconnected.wait(10) and standin.sent == FIRST_TOKENS  # nothing more was written
    with pytest.raises(Exception) as e:
        list(it)
    assert getattr(e.value, "code", None) == "cancelled"
    assert _wait(lambda: not service.engine_busy)
    standin.hold(None)
    standin.script = "next answer"
    r = requests.post(f"{url}/v1/analyze", json={"task": "report", "image": b64(encode_png(IMG))}, timeout=30)
    assert r.status_code == 200 and r.json()["text"] == "next answer"


def test_a_vllm_error_mid_stream_is_an_error_event(streamed):
    url, standin, _, _ = streamed
    standin.script = "The lungs are clear."
    standin.hold(None, fail_after=4)
    png = b64(encode_png(IMG))
    with requests.post(
        f"{url}/v1/analyze", json={"task": "report", "image": png, "stream": True}, stream=True, timeout=30
    ) as r:
        events = list(_sse(r))
    assert [e.event for e in events][-1] == "error" and "delta" in [e.event for e in events]
    err = protocol.from_dict(protocol.ErrorBody, events[-1].json()).error
    assert err.code == "engine_error" and "failed mid-answer" in err.message and "CUDA error" in err.message
    standin.hold(None)
    r = requests.post(f"{url}/v1/analyze", json={"task": "report", "image": png}, timeout=30)
    assert r.status_code == 200 and r.json()["text"] == "The lungs are clear."  # still serving


def test_cancelling_one_row_of_a_batch_closes_only_its_vllm_stream(streamed):
    """Two rows in one engine call, each its own streamed request: cancelling the first closes its connection
    while the second, held at the same point, goes on to its whole answer."""
    _, standin, engine, _ = streamed
    standin.script = "The lungs are clear."
    standin.hold(FIRST_TOKENS)
    got: dict[int, list[str]] = {0: [], 1: []}
    rows = [
        AnalysisInput(
            task="report",
            image=DecodedImage(IMG, "PNG"),
            on_text=got[k].append,
            cancelled=threading.Event(),
        )
        for k in (0, 1)
    ]
    out: list = []
    worker = threading.Thread(target=lambda: out.extend(engine.analyze_batch(rows, StopToken())))
    worker.start()
    try:
        assert _wait(lambda: bool(got[0]) and bool(got[1]))  # both streams sent their first token and wait
        rows[0].cancelled.set()
        assert standin.disconnected.wait(10)
        standin.release.set()
    finally:
        standin.release.set()
        worker.join(30)
    assert out[0].cancelled and not out[1].cancelled
    assert out[1].text == "".join(got[1]) == "The lungs are clear." and got[0] == [_first_piece(standin)]
    assert [b["stream"] for b in standin.bodies[-2:]] == [True, True]


def test_a_vllm_server_silent_past_the_timeout_mid_stream_did_not_answer(streamed):
    """The stream began, then nothing for longer than the client's timeout: 'did not answer within', not 'broke off'."""
    url, standin, engine, service = streamed
    standin.script = "The lungs are clear."
    standin.hold(FIRST_TOKENS)
    timeout0, engine._remote.timeout_s = engine._remote.timeout_s, 0.3
    try:
        r = requests.post(f"{url}/v1/analyze", json={"task": "report", "image": b64(encode_png(IMG))}, timeout=30)
        msg = r.json()["error"]["message"]
        assert r.status_code == 503 and "did not answer within 1 s" in msg and "broke off" not in msg, msg  # 1 s floor
        assert standin.disconnected.wait(10) and _wait(lambda: not service.engine_busy)
    finally:
        engine._remote.timeout_s = timeout0
        standin.hold(None)
