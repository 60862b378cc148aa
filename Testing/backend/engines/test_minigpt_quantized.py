"""--quantize 8bit / 4bit (bitsandbytes) on the tiny MiniGPT-Med: the LLM's linear layers are really quantized and the
answers match full precision (the tiny model's greedy margins are far above quantization noise)."""

from __future__ import annotations

import pytest
from conftest import blob_image
from minigpt_fixtures import tiny_files

from backend.engines.base import AnalysisInput, DecodedImage, StopToken
from backend.engines.minigptmed import MiniGPTMedEngine
from backend.settings import MiniGPTMedSettings

pytest.importorskip("bitsandbytes")  # installed by `make setup` (dev extra)


def _engine(quantize: str) -> MiniGPTMedEngine:
    t = tiny_files()
    e = MiniGPTMedEngine(
        MiniGPTMedSettings(
            eva=str(t.eva),
            llama=str(t.llama),
            checkpoint=str(t.checkpoint),
            model_config=str(t.model_config),
            device="cpu",
            quantize=quantize,
        )
    )
    e.load()
    return e


def _answers(e: MiniGPTMedEngine) -> list[str]:
    img = DecodedImage(blob_image(), "PNG")
    inputs = [
        AnalysisInput(task="detect", image=img, modality="CT", max_new_tokens=24),
        AnalysisInput(task="report", image=img, max_new_tokens=24),
    ]
    return [r.raw_output for r in e.analyze_batch(inputs, StopToken())]


@pytest.mark.parametrize("quantize,layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_llm_gives_the_full_precision_answers(quantize, layer):
    full = _answers(_engine("none"))
    e = _engine(quantize)
    assert type(e.model.llm.model.layers[0].mlp.down_proj).__name__ == layer
    assert quantize in e.info().device
    assert _answers(e) == full
