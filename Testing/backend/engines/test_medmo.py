"""MedMO (--family medmo): its box syntax, and its boxes through the real hf and openai engines over HTTP on a
portrait and a landscape image (expected pixels computed here from MedMO's 0..1000 frame)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import requests
from conftest import b64
from loopback_http import JSONHandler, LoopbackServer
from medmo_fixtures import scripted_medmo
from MiniGPTMedSlicerLib.png import encode_png

from backend import families
from backend.engines.hf import HFEngine
from backend.engines.openai_engine import OpenAIEngine
from backend.medmo_syntax import format_boxes, parse
from backend.server_thread import ServerThread
from backend.settings import HFSettings, OpenAISettings

README_ANSWER = "Fractures <box>[[156, 516, 231, 607], [240, 529, 296, 581]]</box>"  # genmilab/MedMO README


def test_syntax_labels_several_boxes_and_damage():
    a = parse(README_ANSWER)
    assert [(b.label, b.coords) for b in a.boxes] == [
        ("Fractures", [156, 516, 231, 607]),
        ("Fractures", [240, 529, 296, 581]),
    ]
    assert a.text == "Fractures" and not a.warnings
    a = parse("Two findings. Mass <box>[[1, 2, 3, 4]]</box>, and nodule <box>[5.5, 6, 7, 8]</box>.")
    assert [(b.label, b.coords) for b in a.boxes] == [("Mass", [1, 2, 3, 4]), ("nodule", [5.5, 6, 7, 8])]
    assert a.text == "Two findings. Mass, and nodule."
    a = parse("Effusion <box>[[1, 2, 3, 4], [5, 6, 7]]</box> Cut <box>[[10, 20, 30, 40], [50, 6")
    assert [(b.label, b.coords) for b in a.boxes] == [("Effusion", [1, 2, 3, 4]), ("Cut", [10, 20, 30, 40])]
    assert any("not four numbers" in w for w in a.warnings) and any("not closed" in w for w in a.warnings)
    assert parse("No acute abnormality.").boxes == []
    assert format_boxes([[0, 0, 500.4, 1000]]) == "<box>[[0, 0, 500, 1000]]</box>"


def _expected(width: int, height: int) -> list[list[float]]:
    """README_ANSWER's quads on 0..1000 of the image -> pixels, written out independently of the decoder."""
    quads = [(156, 516, 231, 607), (240, 529, 296, 581)]
    return [[x0 * width / 1000, y0 * height / 1000, x1 * width / 1000, y1 * height / 1000] for x0, y0, x1, y1 in quads]


PORTRAIT = (90, 160)  # width, height
LANDSCAPE = (200, 120)


def _image(width: int, height: int) -> str:
    a = np.zeros((height, width), np.uint8)
    a[height // 3 : height // 2, width // 4 : width // 2] = 200
    return b64(encode_png(a))


def _check_boxes(url: str, engine: str) -> None:
    for w, h in (PORTRAIT, LANDSCAPE):
        r = requests.post(
            f"{url}/v1/analyze", json={"task": "detect", "image": _image(w, h), "max_new_tokens": 80}, timeout=300
        )
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["engine"] == engine and out["text"] == "Fractures"
        assert [f["label"] for f in out["findings"]] == ["Fractures", "Fractures"]
        for f, want in zip(out["findings"], _expected(w, h), strict=True):
            assert np.allclose(f["box"], want, atol=1.0), (w, h, f["box"], want)


class _StandInServer(JSONHandler):
    """A remote vLLM serving MedMO cannot run here: the OpenAI chat protocol on a real socket, with a fixed answer."""

    answer = README_ANSWER
    bodies: ClassVar[list] = []

    def do_GET(self):
        self.send_json(200, {"object": "list", "data": [{"id": "MBZUAI/MedMO-4B", "object": "model"}]})

    def do_POST(self):
        body = self.read_json()
        type(self).bodies.append(body)
        msg = {"role": "assistant", "content": self.answer}
        self.send_json(200, {"choices": [{"index": 0, "finish_reason": "stop", "message": msg}]})


@pytest.fixture
def stand_in():
    _StandInServer.bodies = []
    with LoopbackServer(_StandInServer) as server:
        yield server.url


def test_prompts_are_the_readme_ones_and_identify_names_the_region_on_0_1000():
    g = families.ImageGeometry(width=200, height=100)
    assert (
        families.prompt_for("medmo", "detect", None, None, g) == "Detect and localize all abnormalities in this image."
    )
    assert families.prompt_for("medmo", "report", None, None, g, modality="CT") == (
        "Generate a detailed radiology report for this CT scan."  # the README's report prompt
    )
    assert families.prompt_for("medmo", "ground", "the left lung", None, g) == (
        "Detect and localize the left lung in this image."
    )
    p = families.prompt_for("medmo", "identify", None, (50, 25, 100, 100), g)
    assert "<box>[[250, 250, 500, 1000]]</box>" in p  # x / 200 * 1000, y / 100 * 1000


@pytest.fixture(scope="module")
def hf_medmo_url():
    engine = HFEngine(HFSettings(model=str(scripted_medmo(README_ANSWER)), family="medmo", device="cpu"))
    with ServerThread(engine) as url:
        yield url


def test_hf_engine_medmo_boxes_land_where_the_answer_put_them(hf_medmo_url):
    health = requests.get(f"{hf_medmo_url}/health", timeout=10).json()
    assert "medmo" in health["model"] and "detect" in health["tasks"]
    _check_boxes(hf_medmo_url, "hf")


def test_hf_engine_medmo_answers_report_ground_identify_over_http(hf_medmo_url):
    png = _image(*LANDSCAPE)
    for body in (
        {"task": "report", "modality": "CT"},
        {"task": "ground", "question": "the fracture"},
        {"task": "identify", "region": [10, 10, 60, 50]},
    ):
        r = requests.post(f"{hf_medmo_url}/v1/analyze", json={**body, "image": png, "max_new_tokens": 80}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["raw_output"] == README_ANSWER  # the scripted answer, through the real generate()


def test_openai_engine_medmo_boxes_and_the_request_it_sends(stand_in):
    with ServerThread(OpenAIEngine(OpenAISettings(url=stand_in, family="medmo"))) as url:
        _check_boxes(url, "openai")
    sent = _StandInServer.bodies[-1]
    assert sent["model"] == "MBZUAI/MedMO-4B" and sent["temperature"] == 0.0
    image_part, text_part = sent["messages"][0]["content"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert text_part["text"] == "Detect and localize all abnormalities in this image."
