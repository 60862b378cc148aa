"""Each peer family's box geometry through the real engines (issue 13 §2): MedGemma, Qwen2.5-VL and Qwen3-VL in the
``hf`` engine (a tiny random model whose greedy answer is scripted by a ``sequence_bias``) and in the ``openai``
engine (a stand-in OpenAI server on a real socket that answers from the image it received), over HTTP, on a portrait,
a landscape and a square image, none of whose sides is a multiple of 28.

The expected pixel boxes are computed HERE from each model's published convention, never with the project's codecs:

* MedGemma: ``box_2d`` = [y0, x0, y1, x1] on 0..1000 of the image zero-padded to a square, the padding split evenly
  (the left/top share is the floor of half the difference);
* Qwen2.5-VL: ``bbox_2d`` in pixels of the image after Qwen's smart resize (each side rounded to a multiple of 28;
  if the area is above max_pixels, both sides scaled by sqrt(area / max_pixels) and floored to multiples of 28;
  below min_pixels, scaled by sqrt(min_pixels / area) and ceiled), min/max read from the model folder;
* Qwen3-VL: ``bbox_2d`` on 0..1000 of the image.

MiniGPT-Med's geometry through its engines (the local LLaMA and the vLLM route) is in test_minigpt_vllm.py; MedMO's
in test_medmo.py.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable
from contextlib import ExitStack
from typing import ClassVar

import numpy as np
import pytest
import requests
from conftest import b64
from loopback_http import JSONHandler, LoopbackServer
from MiniGPTMedSlicerLib.png import encode_png
from peer_fixtures import scripted_peer

from backend.engines.hf import HFEngine
from backend.engines.openai_engine import OpenAIEngine
from backend.server_thread import ServerThread
from backend.settings import HFSettings, OpenAISettings

# width, height: none a multiple of 28 (nor of Qwen3-VL's 32)
SHAPES = {"portrait": (90, 150), "landscape": (170, 100), "square": (120, 120)}
# Qwen2.5-VL also below the tiny processor's min_pixels (the scale-up branch of the resize)
QWEN25_SHAPES = {**SHAPES, "small": (40, 30)}


def _image(w: int, h: int) -> np.ndarray:
    """A gray image with a bright block and a gradient (so that padding and placement are visible)."""
    a = np.add.outer(np.arange(h) * 100 // h, np.arange(w) * 100 // w).astype(np.uint8) + 20
    a[h // 4 : h // 2, w // 3 : (2 * w) // 3] = 230
    return a


# -- the models' conventions, written out here ---------------------------------------------------------------------


def medgemma_to_pixels(box_2d, w: int, h: int) -> list[float]:
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    y0, x0, y1, x1 = box_2d
    return [x0 * side / 1000 - left, y0 * side / 1000 - top, x1 * side / 1000 - left, y1 * side / 1000 - top]


def qwen_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) after Qwen2-VL / Qwen2.5-VL's documented smart resize."""
    rh = max(factor, round(h / factor) * factor)
    rw = max(factor, round(w / factor) * factor)
    if rh * rw > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        rh = max(factor, math.floor(h / beta / factor) * factor)
        rw = max(factor, math.floor(w / beta / factor) * factor)
    elif rh * rw < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        rh = math.ceil(h * beta / factor) * factor
        rw = math.ceil(w * beta / factor) * factor
    return rh, rw


def resized_to_pixels(bbox, w: int, h: int, rw: int, rh: int) -> list[float]:
    x0, y0, x1, y1 = bbox
    return [x0 * w / rw, y0 * h / rh, x1 * w / rw, y1 * h / rh]


def norm1000_to_pixels(bbox, w: int, h: int) -> list[float]:
    x0, y0, x1, y1 = bbox
    return [x0 * w / 1000, y0 * h / 1000, x1 * w / 1000, y1 * h / 1000]


def test_the_resize_written_here_is_qwens_rule():
    """The test's own resize against sizes worked by hand from Qwen's rule (and transformers' own, where present)."""
    assert qwen_resize(150, 90, 28, 3136, 12544) == (140, 84)  # rounded: 5.36 -> 5, 3.21 -> 3
    assert qwen_resize(100, 170, 28, 3136, 12544) == (84, 140)  # 112 x 168 too big: scaled by sqrt(17000 / 12544)
    assert qwen_resize(30, 40, 28, 3136, 12544) == (56, 84)  # 28 x 28 too small: scaled up by sqrt(3136 / 1200)
    assert qwen_resize(120, 120, 28, 3136, 12544) == (112, 112)
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    except ImportError:  # pragma: no cover - the hand-worked sizes above still hold
        return
    for h, w in [(150, 90), (100, 170), (30, 40), (120, 120), (511, 384), (1000, 37)]:
        assert qwen_resize(h, w, 28, 3136, 12544) == tuple(smart_resize(h, w, 28, 3136, 12544))


# -- the hf engine: scripted tiny models ---------------------------------------------------------------------------

MEDGEMMA_BOX = [300, 350, 600, 750]  # y0, x0, y1, x1: inside the image part of the square for every shape
MEDGEMMA_ANSWER = 'Final Answer: ```json [{"box_2d": [300, 350, 600, 750], "label": "mass"}] ```'
QWEN25_BOX = [14, 21, 63, 50]  # pixels of the resized image (the smallest resized side here is 56)
QWEN25_ANSWER = '```json [{"bbox_2d": [14, 21, 63, 50], "label": "mass"}] ```'
QWEN3_BOX = [120, 250, 640, 875]
QWEN3_ANSWER = '```json [{"bbox_2d": [120, 250, 640, 875], "label": "mass"}] ```'
ANSWERS = {"medgemma": MEDGEMMA_ANSWER, "qwen2_5_vl": QWEN25_ANSWER, "qwen3_vl": QWEN3_ANSWER}


@pytest.fixture(scope="module")
def hf_url():
    """One real server per family, each loading its scripted tiny folder once, started when first asked for."""
    urls: dict[str, str] = {}
    folders: dict[str, str] = {}
    with ExitStack() as stack:

        def get(family: str) -> tuple[str, str]:
            if family not in urls:
                folders[family] = str(scripted_peer(family, ANSWERS[family]))
                # float32: MedGemma's bf16 default is slow on a CPU, and the geometry does not depend on it
                engine = HFEngine(HFSettings(model=folders[family], family=family, device="cpu", dtype="float32"))
                urls[family] = stack.enter_context(ServerThread(engine))
            return urls[family], folders[family]

        yield get


def _detect(url: str, w: int, h: int) -> dict:
    r = requests.post(
        f"{url}/v1/analyze",
        json={"task": "detect", "image": b64(encode_png(_image(w, h))), "max_new_tokens": 120},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _detect_batch(url: str, shapes: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """All shapes in one /v1/analyze/batch (one left-padded generate() in the hf engine, each row its geometry)."""
    items = [
        {"task": "detect", "image": b64(encode_png(_image(w, h))), "max_new_tokens": 120} for w, h in shapes.values()
    ]
    r = requests.post(f"{url}/v1/analyze/batch", json={"items": items}, timeout=300)
    assert r.status_code == 200, r.text
    return dict(zip(shapes, r.json()["results"], strict=True))


def _only_box(out: dict, want: list[float], what) -> None:
    assert [f["label"] for f in out["findings"]] == ["mass"], (what, out)
    got = out["findings"][0]["box"]
    assert np.allclose(got, want, atol=1.0), (what, got, want)


def test_hf_medgemma_box_undoes_the_padding_on_either_axis(hf_url):
    url, _ = hf_url("medgemma")
    for shape, out in _detect_batch(url, SHAPES).items():
        w, h = SHAPES[shape]
        assert out["raw_output"] == MEDGEMMA_ANSWER  # the scripted answer, through the real generate()
        _only_box(out, medgemma_to_pixels(MEDGEMMA_BOX, w, h), shape)


def test_hf_qwen2_5_vl_box_undoes_the_smart_resize(hf_url):
    url, folder = hf_url("qwen2_5_vl")
    cfg = json.loads(open(f"{folder}/preprocessor_config.json").read())
    size = cfg.get("size") or {}
    min_pixels = int(cfg.get("min_pixels") or size["shortest_edge"])
    max_pixels = int(cfg.get("max_pixels") or size["longest_edge"])
    factor = int(cfg["patch_size"]) * int(cfg["merge_size"])
    for shape, out in _detect_batch(url, QWEN25_SHAPES).items():
        w, h = QWEN25_SHAPES[shape]
        rh, rw = qwen_resize(h, w, factor, min_pixels, max_pixels)
        assert shape == "square" or (rh != rw and (rh, rw) != (h, w))  # the box really is in another frame
        assert out["raw_output"] == QWEN25_ANSWER
        _only_box(out, resized_to_pixels(QWEN25_BOX, w, h, rw, rh), (shape, rw, rh))


def test_hf_qwen3_vl_box_on_0_1000_of_the_image(hf_url):
    url, _ = hf_url("qwen3_vl")
    for shape, out in _detect_batch(url, SHAPES).items():
        w, h = SHAPES[shape]
        assert out["raw_output"] == QWEN3_ANSWER
        _only_box(out, norm1000_to_pixels(QWEN3_BOX, w, h), shape)


# -- the openai engine: a stand-in server that answers from the image it received -----------------------------------

#: Qwen2.5-VL's released preprocessor_config (what a vLLM serving it resizes with unless told otherwise)
QWEN25_SERVER_MIN_PIXELS, QWEN25_SERVER_MAX_PIXELS = 56 * 56, 28 * 28 * 16384


class _StandIn(JSONHandler):
    """A remote vLLM cannot run here: the OpenAI chat protocol on a real socket. ``answer`` writes the model's text
    from the PNG it received; every received image is kept."""

    answer: ClassVar[Callable[[np.ndarray], str]] = staticmethod(lambda img: "")
    received: ClassVar[list[np.ndarray]] = []

    def do_GET(self):
        self.send_json(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

    def do_POST(self):
        from PIL import Image

        body = self.read_json()
        uri = body["messages"][0]["content"][0]["image_url"]["url"]
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("L"))
        type(self).received.append(img)
        msg = {"role": "assistant", "content": type(self).answer(img)}
        self.send_json(200, {"choices": [{"index": 0, "finish_reason": "stop", "message": msg}]})


@pytest.fixture(scope="module")
def openai_url():
    with LoopbackServer(_StandIn) as server, ExitStack() as stack:
        remote = server.url
        urls: dict[str, str] = {}

        def get(family: str, answer: Callable[[np.ndarray], str]) -> str:
            _StandIn.answer = staticmethod(answer)
            _StandIn.received = []
            if family not in urls:
                urls[family] = stack.enter_context(
                    ServerThread(OpenAIEngine(OpenAISettings(url=remote, family=family)))
                )
            return urls[family]

        yield get


@pytest.mark.parametrize("shape", list(SHAPES))
def test_openai_medgemma_sends_the_padded_square_and_undoes_it(openai_url, shape):
    url = openai_url("medgemma", lambda img: MEDGEMMA_ANSWER)
    w, h = SHAPES[shape]
    out = _detect(url, w, h)
    _only_box(out, medgemma_to_pixels(MEDGEMMA_BOX, w, h), shape)
    (sent,) = _StandIn.received  # the image MedGemma saw: zero-padded evenly to a square, the image unscaled
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    want = np.zeros((side, side), np.uint8)
    want[top : top + h, left : left + w] = _image(w, h)
    assert sent.shape == (side, side) and np.array_equal(sent, want), shape


def _qwen25_server_box(img: np.ndarray) -> list[int]:
    """The box a Qwen2.5-VL server writes: pixels of ITS resize of the image it got (a quarter in from the left,
    a fifth down, to 3/5 across and 7/10 down)."""
    rh, rw = qwen_resize(img.shape[0], img.shape[1], 28, QWEN25_SERVER_MIN_PIXELS, QWEN25_SERVER_MAX_PIXELS)
    return [round(rw / 4), round(rh / 5), round(rw * 3 / 5), round(rh * 7 / 10)]


def _qwen25_server_answer(img: np.ndarray) -> str:
    return '```json [{"bbox_2d": ' + json.dumps(_qwen25_server_box(img)) + ', "label": "mass"}] ```'


@pytest.mark.parametrize("shape", list(QWEN25_SHAPES))
def test_openai_qwen2_5_vl_boxes_in_the_servers_resized_frame(openai_url, shape):
    url = openai_url("qwen2_5_vl", _qwen25_server_answer)
    w, h = QWEN25_SHAPES[shape]
    out = _detect(url, w, h)
    (sent,) = _StandIn.received
    rh, rw = qwen_resize(sent.shape[0], sent.shape[1], 28, QWEN25_SERVER_MIN_PIXELS, QWEN25_SERVER_MAX_PIXELS)
    _only_box(out, resized_to_pixels(_qwen25_server_box(sent), w, h, rw, rh), (shape, sent.shape))
    # the engine sends a stretch of the whole image (aspect within one 28-px step), so the server's frame is it
    assert abs(sent.shape[1] / sent.shape[0] - w / h) < 28 / min(sent.shape), (shape, sent.shape)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_openai_qwen3_vl_box_on_0_1000_of_the_image(openai_url, shape):
    url = openai_url("qwen3_vl", lambda img: QWEN3_ANSWER)
    w, h = SHAPES[shape]
    _only_box(_detect(url, w, h), norm1000_to_pixels(QWEN3_BOX, w, h), shape)
