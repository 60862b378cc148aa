"""The MiniGPT-Med engine end to end: a real uvicorn server with the tiny model built from the original file layout,
real PNG bytes, all five tasks, batches, the image cache, conversion and the console script."""

from __future__ import annotations

import time

import pytest
import requests
from backend_process import BackendProcess
from conftest import b64
from minigpt_fixtures import ANSWERS, _training_images, tiny_files
from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib.png import encode_png

from backend.engines.minigptmed import MiniGPTMedEngine
from backend.minigpt.boxes import parse_answer
from backend.server_thread import ServerThread
from backend.settings import MiniGPTMedSettings

IMG = _training_images()[0]  # 96 x 128 gray slice
H, W = IMG.shape


@pytest.fixture(scope="module")
def tiny():
    return tiny_files()


def _engine(tiny, **kw) -> MiniGPTMedEngine:
    e = MiniGPTMedEngine(
        MiniGPTMedSettings(
            eva=str(tiny.eva),
            llama=str(tiny.llama),
            checkpoint=str(tiny.checkpoint),
            model_config=str(tiny.model_config),
            **kw,
        )
    )
    e.load()
    return e


@pytest.fixture(scope="module")
def server(tiny):
    with ServerThread(_engine(tiny)) as url:
        yield url


@pytest.fixture(scope="module")
def png() -> str:
    return b64(encode_png(IMG))


REQUESTS = {
    "report": {"task": "report"},
    "vqa": {"task": "vqa", "question": "is there a mass?"},
    "detect": {"task": "detect", "question": "tumor", "modality": "CT"},
    "ground": {"task": "ground", "question": "nodule"},
    "identify": {"task": "identify", "region": [0.25 * W, 0.25 * H, 0.5 * W, 0.5 * H]},
}


def _analyze(url, body) -> protocol.AnalyzeResponse:
    r = requests.post(f"{url}/v1/analyze", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return protocol.from_dict(protocol.AnalyzeResponse, r.json())


def _grid_box(g):
    return [g[0] / 100 * W, g[1] / 100 * H, g[2] / 100 * W, g[3] / 100 * H]


def test_health_reports_the_engine(server):
    h = protocol.from_dict(protocol.Health, requests.get(f"{server}/health", timeout=10).json())
    assert h.engine == "minigptmed" and h.max_batch == 8 and set(h.tasks) == set(REQUESTS)
    assert "MiniGPT-Med" in h.model and h.device.startswith("cpu")


def test_all_five_tasks_over_http(server, png):
    out = {t: _analyze(server, {**b, "image": png}) for t, b in REQUESTS.items()}
    assert out["report"].text == ANSWERS["Describe this image in detail"] and out["report"].findings == []
    assert out["vqa"].text == "yes"
    det = out["detect"]
    assert det.raw_output == ANSWERS["[detection] tumor"]
    assert [(f.label, f.box) for f in det.findings] == [("tumor", pytest.approx(_grid_box((10, 20, 30, 40))))]
    assert det.text == "tumor"
    gr = out["ground"]
    assert [(f.label, f.box) for f in gr.findings] == [("nodule", pytest.approx(_grid_box((60, 60, 80, 90))))]
    ident = out["identify"]  # the region goes to the model as {<25><25><50><50>}
    assert ident.text == "a small nodule"
    assert ident.findings[0].box == pytest.approx(REQUESTS["identify"]["region"])
    for r in out.values():
        assert r.engine == "minigptmed" and r.timings_ms["prompt_tokens"] > 256
        parsed = parse_answer(r.raw_output, W, H)
        if r.task in ("detect", "ground"):
            assert len(r.findings) == len(parsed.boxes) > 0
            for f, b in zip(r.findings, parsed.boxes, strict=True):
                assert f.box == pytest.approx(b.box, abs=1e-3)


def test_detect_default_label_per_modality_and_prompt_override(server, png):
    xr = _analyze(server, {"task": "detect", "image": png, "modality": "XR"})  # -> "[detection] pneumonia"
    assert [f.label for f in xr.findings] == ["pneumonia", "pneumonia"]
    assert xr.findings[0].box == pytest.approx(_grid_box((50, 10, 90, 60)))
    over = _analyze(server, {"task": "report", "image": png, "prompt": "[detection] tumor"})
    assert over.raw_output == ANSWERS["[detection] tumor"]


def test_batch_endpoint_equals_one_at_a_time(server, png):
    items = [{**b, "image": png} for b in REQUESTS.values()]
    items.append({"task": "report", "image": b64(encode_png(_training_images()[2]))})
    r = requests.post(f"{server}/v1/analyze/batch", json={"items": items}, timeout=120)
    assert r.status_code == 200, r.text
    batch = protocol.from_dict(protocol.BatchResponse, r.json()).results
    singles = [_analyze(server, it) for it in items]
    assert [b.raw_output for b in batch] == [s.raw_output for s in singles]
    assert [[f.box for f in b.findings] for b in batch] == [[f.box for f in s.findings] for s in singles]


def test_follow_up_on_the_same_slice_reuses_the_vision_encoding(server):
    img = b64(encode_png(_training_images()[1]))
    first = _analyze(server, {"task": "vqa", "question": "is there a mass?", "image": img})
    second = _analyze(server, {"task": "report", "image": img})
    assert first.timings_ms["vision_cached"] == 0.0 and second.timings_ms["vision_cached"] == 1.0


def test_generation_config_of_the_llama_folder_does_not_win(tiny):
    import json

    gc = json.loads((tiny.llama / "generation_config.json").read_text())
    assert gc["do_sample"] is True  # the folder asks for sampling ...
    e = _engine(tiny)
    from backend.engines.base import AnalysisInput, DecodedImage, StopToken

    inp = AnalysisInput(task="detect", image=DecodedImage(IMG, "PNG"), question="tumor")
    outs = {e.analyze_batch([inp], StopToken())[0].raw_output for _ in range(3)}
    assert outs == {ANSWERS["[detection] tumor"]}  # ... but decoding is greedy and deterministic


def test_convert_round_trip_gives_identical_outputs(tiny, tmp_path):
    from backend.cli import main
    from backend.engines.base import AnalysisInput, DecodedImage, StopToken

    ref = _engine(tiny, merge_lora=False)
    inputs = [
        AnalysisInput(
            task=b["task"],
            image=DecodedImage(IMG, "PNG"),
            question=b.get("question"),
            region=tuple(b["region"]) if "region" in b else None,
            max_new_tokens=24,
        )
        for b in REQUESTS.values()
    ]
    want = [r.raw_output for r in ref.analyze_batch(inputs, StopToken())]
    orig = _engine(tiny)
    assert [r.raw_output for r in orig.analyze_batch(inputs, StopToken())] == want
    for keep in (False, True):
        out = tmp_path / f"converted-{keep}"
        args = ["convert", *tiny.args(), "--out", str(out)] + (["--keep-lora"] if keep else [])
        assert main(args) == 0
        assert (out / "lora.safetensors").exists() == keep
        t0 = time.perf_counter()
        conv = MiniGPTMedEngine(MiniGPTMedSettings(converted=str(out)))
        conv.load()
        assert time.perf_counter() - t0 < 30
        assert conv.report.source == "converted"
        got = [r.raw_output for r in conv.analyze_batch(inputs, StopToken())]
        assert got == want
        emb_a = orig.model.encode_images(__import__("torch").zeros(1, 3, 448, 448))
        emb_b = conv.model.encode_images(__import__("torch").zeros(1, 3, 448, 448))
        assert (emb_a - emb_b).abs().max().item() == 0.0


def test_console_script_serves_health_and_answers(tiny):
    with BackendProcess("--engine", "minigptmed", *tiny.args()) as proc:
        h = requests.get(f"{proc.url}/health", timeout=10).json()
        assert h["engine"] == "minigptmed" and h["status"] == "ok"
        r = requests.post(
            f"{proc.url}/v1/analyze",
            json={"task": "vqa", "question": "is there a mass?", "image": b64(encode_png(IMG))},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["text"] == "yes"


def test_missing_files_fail_at_start_with_a_clear_error(tiny, tmp_path):
    from backend.cli import flag_message
    from backend.setting_error import SettingError

    e = MiniGPTMedEngine(
        MiniGPTMedSettings(
            eva=str(tmp_path / "nope.pth"),
            llama=str(tiny.llama),
            checkpoint=str(tiny.checkpoint),
            model_config=str(tiny.model_config),
        )
    )
    with pytest.raises(SettingError, match=r"^eva: .*does not exist") as err:
        e.load()
    assert flag_message(err.value).startswith("--eva: ")  # the command line names its flag


def test_static_decode_option_gives_the_same_answers(tiny, monkeypatch):
    from backend.engines.base import AnalysisInput, DecodedImage, StopToken

    inputs = [
        AnalysisInput(
            task=b["task"],
            image=DecodedImage(IMG, "PNG"),
            question=b.get("question"),
            region=tuple(b["region"]) if "region" in b else None,
        )
        for b in REQUESTS.values()
    ]
    want = [r.raw_output for r in _engine(tiny).analyze_batch(inputs, StopToken())]
    e = _engine(tiny, static_decode=True)
    assert e.static_decode and e._static is not None  # made and warmed at load
    assert [r.raw_output for r in e.analyze_batch(inputs, StopToken())] == want
    assert [e.analyze_batch([i], StopToken())[0].raw_output for i in inputs] == want


def test_static_decode_flag_and_environment_reach_the_engine():
    from backend.cli import build_parser, engine_settings
    from backend.engines import build_engine

    def engine(argv, env):
        e = build_engine(engine_settings(build_parser().parse_args(["serve", "--engine", "minigptmed", *argv]), env))
        assert isinstance(e, MiniGPTMedEngine)
        return e

    assert engine(["--static-decode"], {}).static_decode is True
    assert engine([], {"MINIGPTMED_STATIC_DECODE": "1"}).static_decode is True
    assert engine([], {"MINIGPTMED_STATIC_DECODE": "0"}).static_decode is False
    assert engine([], {}).static_decode is False
    assert engine([], {"MINIGPTMED_STATIC_MAX_LEN": "512"}).static_max_len == 512
