"""The hf engine in a conversation, on the tiny offline Qwen2.5-VL behind the real server: the earlier turns go
into Qwen's own chat template (the image once, in the first user message; the answer as the assistant's message),
a streamed answer's deltas add up to its text, and cancelling one row of a batch ends that row at the next decode step
while the other row's answer is the one it gives alone."""

from __future__ import annotations

import json
import threading

import pytest
import requests
from conftest import b64, blob_image
from MiniGPTMedSlicerLib.png import encode_png
from MiniGPTMedSlicerLib.sse import SseParser
from peer_fixtures import peer_model

from backend.engines.base import AnalysisInput, DecodedImage, StopToken, Turn
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
    url, engine = served
    body = {"task": "report", "image": b64(encode_png(IMG)), "max_new_tokens": 12, "stream": True}
    r = requests.post(f"{url}/v1/analyze", json=body, stream=True, timeout=120)
    parser, events = SseParser(), []
    for chunk in r.iter_content(chunk_size=None):
        events += parser.feed(chunk)
    assert events[-1].event == "done"
    deltas = [e.json()["text"] for e in events if e.event == "delta"]
    assert "".join(deltas) == events[-1].json()["raw_output"]
    timings = events[-1].json()["timings_ms"]
    assert timings["new_tokens"] >= 1
    prompt = engine._prepare(AnalysisInput(task="report", image=DecodedImage(IMG, "PNG")))[0]
    assert timings["prompt_tokens"] == len(engine.tokenizer(prompt)["input_ids"])
    # an OpenAI client streaming from our /v1/chat/completions gets the same counts in usage
    uri = "data:image/png;base64," + body["image"]
    chat = {"stream": True, "task": "report", "max_tokens": 12}
    chat["messages"] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}]
    with requests.post(f"{url}/v1/chat/completions", json=chat, stream=True, timeout=120) as r:
        lines = [ln[len("data: ") :] for ln in r.iter_lines(decode_unicode=True) if ln]
    usage = json.loads(lines[-2])["usage"]
    assert usage["prompt_tokens"] == timings["prompt_tokens"] and usage["completion_tokens"] == timings["new_tokens"]


class _Steps:
    """A forward hook on the real model: the ids fed at each decode step (one per row), and a cancel set from inside
    the decode loop after ``cancel_at`` forward calls."""

    def __init__(self, model, cancel: threading.Event | None = None, cancel_at: int = 0):
        self.fed: list[list[int]] = []  # per forward call after the prefill: the token fed for each row
        self.calls, self.cancel, self.cancel_at = 0, cancel, cancel_at
        self.handle = model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        self.calls += 1
        if self.calls > 1:
            self.fed.append([int(t) for t in kwargs["input_ids"][:, -1].tolist()])
        if self.cancel is not None and self.calls == self.cancel_at:
            self.cancel.set()  # before this step's logits are turned into tokens


def test_cancelling_one_row_ends_it_at_the_next_step_and_keeps_the_other(served):
    _, engine = served
    img = DecodedImage(IMG, "PNG")
    keep = dict(task="vqa", image=img, question="Is there a nodule?", max_new_tokens=8)
    drop = dict(task="report", image=DecodedImage(IMG[:80], "PNG"), max_new_tokens=40)
    alone = engine.analyze_batch([AnalysisInput(**keep)], StopToken())[0]
    assert alone.timings_ms["new_tokens"] >= 4  # the tiny model writes several tokens before it ends
    gone = threading.Event()
    steps = _Steps(engine.model, gone, cancel_at=3)  # the prefill and two decode steps, then the cancel
    try:
        out = engine.analyze_batch([AnalysisInput(**keep), AnalysisInput(**drop, cancelled=gone)], StopToken())
    finally:
        steps.handle.remove()
    assert not out[0].cancelled and out[0].raw_output == alone.raw_output and out[0].text == alone.text
    assert out[1].cancelled and out[1].text == "" and out[1].findings == []
    fed_after = [row[1] for row in steps.fed[2:]]  # the cancelled row's tokens chosen after the cancel
    ended = {*engine._end_ids(), int(engine.tokenizer.pad_token_id)}
    real = [t for t in fed_after if t not in ended]
    assert real == [] and fed_after[0] in engine._end_ids()  # one step to end it, then only padding
    # generate() returned when the kept row was done (8 tokens at most), not at the cancelled row's 40
    assert steps.calls <= 8 + 1, steps.calls


def test_a_follow_up_skips_the_image_processor(served):
    """Qwen's processed pixel values are kept per image (LRU): a follow-up about the same image, with the earlier turn,
    does not run the image processor again, and asking the first question again gives the same answer."""
    _, engine = served
    img = DecodedImage(blob_image(size=96, seed=7)[:, :72], "PNG")  # an image no other test sends
    calls = engine.image_processor_calls
    first = engine.analyze_batch([AnalysisInput(task="report", image=img, max_new_tokens=6)], StopToken())[0]
    assert engine.image_processor_calls == calls + 1
    turn = Turn("report", None, first.raw_output)
    follow = AnalysisInput(task="vqa", image=img, question="Which side?", history=(turn,), max_new_tokens=6)
    engine.analyze_batch([follow], StopToken())
    again = engine.analyze_batch([AnalysisInput(task="report", image=img, max_new_tokens=6)], StopToken())[0]
    assert engine.image_processor_calls == calls + 1 and again.raw_output == first.raw_output


def test_every_streaming_row_of_a_batch_streams(served):
    """Two streamed requests in one batch (as the worker merges concurrent ones): each row's pieces arrive while it
    is decoded, add up to its own answer, and the answers are those each gives alone."""
    _, engine = served
    a = dict(task="vqa", image=DecodedImage(IMG, "PNG"), question="Is there a nodule?", max_new_tokens=10)
    b = dict(task="report", image=DecodedImage(IMG[:80], "PNG"), max_new_tokens=14)
    alone = [engine.analyze_batch([AnalysisInput(**x)], StopToken())[0] for x in (a, b)]
    pieces: list[list[str]] = [[], []]
    steps = _Steps(engine.model)
    at_step: list[list[int]] = [[], []]  # the forward calls seen when each piece arrived

    def feed(k):
        def on_text(t: str) -> None:
            pieces[k].append(t)
            at_step[k].append(steps.calls)

        return on_text

    try:
        out = engine.analyze_batch(
            [AnalysisInput(**a, on_text=feed(0)), AnalysisInput(**b, on_text=feed(1))], StopToken()
        )
    finally:
        steps.handle.remove()
    for k in (0, 1):
        assert out[k].raw_output == alone[k].raw_output
        assert "".join(pieces[k]) == out[k].raw_output
        assert len(pieces[k]) >= 2 and at_step[k][0] < steps.calls  # pieces before the decode ended, not one at the end
