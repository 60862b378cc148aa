"""The hf engine in a conversation, on the tiny offline Qwen2.5-VL behind the real server: the earlier turns go
into Qwen's own chat template (the image once, in the first user message; the answer as the assistant's message),
and a streamed answer's deltas add up to its text."""

from __future__ import annotations

import pytest
import requests
from conftest import b64, blob_image
from MiniGPTMedSlicerLib.png import encode_png
from MiniGPTMedSlicerLib.sse import SseParser
from peer_fixtures import peer_model

from backend.engines.base import AnalysisInput, DecodedImage, Turn
from backend.engines.hf import HFEngine
from backend.server_thread import ServerThread
from backend.settings import HFSettings

IMG = blob_image(size=96)


@pytest.fixture(scope="module")
def served():
    engine = HFEngine(HFSettings(model=str(peer_model("qwen2_5_vl")), family="qwen2_5_vl", device="cpu"))
    with ServerThread(engine) as url:
        yield url, engine


def test_history_in_qwens_chat_template(served):
    _, engine = served
    inp = AnalysisInput(
        task="vqa",
        image=DecodedImage(IMG, "PNG"),
        question="Which side?",
        history=(Turn("vqa", "Is there a nodule?", "Yes, one."),),
    )
    text = engine._prepare(inp)[0]
    # Qwen's ChatML: <|im_start|>role\n...<|im_end|>; the image's vision tokens once, in the first user message
    first_user = text.index("<|im_start|>user\n")
    answer = text.index("<|im_start|>assistant\nYes, one.<|im_end|>")
    second_user = text.index("<|im_start|>user\nWhich side?", answer)
    assert first_user < text.index("<|vision_start|>") < text.index("Is there a nodule?") < answer < second_user
    assert text.count("<|vision_start|>") == 1 and text.endswith("<|im_start|>assistant\n")
    single = engine._prepare(AnalysisInput(task="vqa", image=DecodedImage(IMG, "PNG"), question="Which side?"))[0]
    assert "Yes, one." not in single and len(single) < len(text)


def test_stream_deltas_add_up(served):
    url, _ = served
    body = {"task": "report", "image": b64(encode_png(IMG)), "max_new_tokens": 12, "stream": True}
    r = requests.post(f"{url}/v1/analyze", json=body, stream=True, timeout=120)
    parser, events = SseParser(), []
    for chunk in r.iter_content(chunk_size=None):
        events += parser.feed(chunk)
    assert events[-1].event == "done"
    deltas = [e.json()["text"] for e in events if e.event == "delta"]
    assert "".join(deltas) == events[-1].json()["raw_output"]
    assert events[-1].json()["timings_ms"]["new_tokens"] >= 1
