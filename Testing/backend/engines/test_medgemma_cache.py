"""The hf engine's MedGemma image cache, on the tiny offline Gemma 3 (its own Gemma3Processor): the engine runs only
the image processor and builds the text side itself, and what it builds (input_ids, attention_mask, token_type_ids,
pixel_values) is what Gemma3Processor's own ``__call__`` builds for the same chat text and square-padded image, in a
left-padded batch of two different prompt lengths and with an earlier turn; a follow-up about the same image skips
the image processor and answers as the processor's own inputs do under greedy decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blob_image
from peer_fixtures import peer_model
from PIL import Image

from backend.engines.base import AnalysisInput, DecodedImage, StopToken, Turn
from backend.engines.hf import HFEngine
from backend.settings import HFSettings


@pytest.fixture(scope="module")
def engine():
    e = HFEngine(HFSettings(model=str(peer_model("medgemma")), family="medgemma", device="cpu"))
    e.load()
    return e


def _square(a: np.ndarray) -> Image.Image:
    """Zero padding to a square, the image centred (MedGemma's convention), built here with numpy."""
    h, w = a.shape[:2]
    s = max(h, w)
    out = np.zeros((s, s, 3), np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    out[top : top + h, left : left + w] = a[..., None] if a.ndim == 2 else a
    return Image.fromarray(out, "RGB")


def _user(text: str, image: bool) -> dict:
    return {"role": "user", "content": [*([{"type": "image"}] if image else []), {"type": "text", "text": text}]}


def _processor_inputs(engine, conversations, arrays) -> dict:
    """Gemma3Processor.__call__ on the chat template's text and the padded images: the uncached path."""
    proc = engine.processor
    texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
    images = [[_square(a)] for a in arrays]
    return dict(proc(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left"))


def _same(ours: dict, theirs: dict) -> None:
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_values"):
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert set(ours) == set(theirs)


A = blob_image(size=96, seed=3)[:, :60]  # tall
B = blob_image(size=96, seed=4)[:50]  # wide


def test_a_batch_is_what_the_processor_builds(engine):
    short, long = "Describe.", "Is there a nodule in the left lower lobe of this slice?"
    inputs = [
        AnalysisInput(task="vqa", image=DecodedImage(A, "PNG"), question="q", prompt=short),
        AnalysisInput(task="vqa", image=DecodedImage(B, "PNG"), question="q", prompt=long),
    ]
    ours = engine._collate([engine._prepare(i) for i in inputs])
    theirs = _processor_inputs(engine, [[_user(short, True)], [_user(long, True)]], [A, B])
    _same(ours, theirs)
    mask = ours["attention_mask"]
    assert mask[0, 0] == 0 and mask[1].all()  # the shorter prompt is padded on the left
    soft = engine.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert (ours["token_type_ids"] == (ours["input_ids"] == soft)).all()
    assert ours["token_type_ids"].sum(1).tolist() == [4, 4]  # image_seq_length soft tokens per row


def test_with_history_is_what_the_processor_builds(engine):
    img = DecodedImage(A, "PNG")
    turn = Turn("vqa", "Is there a nodule?", "Yes, one.")
    inp = AnalysisInput(task="vqa", image=img, question="q", prompt="Which side?", history=(turn,))
    ours = engine._collate([engine._prepare(inp)])
    conversation = [
        _user("Is there a nodule?", True),
        {"role": "assistant", "content": [{"type": "text", "text": "Yes, one."}]},
        _user("Which side?", False),
    ]
    _same(ours, _processor_inputs(engine, [conversation], [A]))


def _greedy_from_processor(engine, conversation, array, max_new_tokens: int) -> str:
    batch = _processor_inputs(engine, [conversation], [array])
    dtype = next(engine.model.parameters()).dtype
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    with torch.inference_mode():
        out = engine.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, top_k=None, top_p=None)
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    ends = set(engine._end_ids()) | {engine.tokenizer.pad_token_id}
    n = next((i for i, t in enumerate(new) if t in ends), len(new))
    return engine.tokenizer.decode(new[:n], skip_special_tokens=True)


def test_a_follow_up_skips_the_image_processor_and_answers_as_uncached(engine):
    arr = blob_image(size=96, seed=11)[:, :72]  # an image no other test sends
    img = DecodedImage(arr, "PNG")
    calls = engine.image_processor_calls
    first = engine.analyze_batch(
        [AnalysisInput(task="vqa", image=img, prompt="Describe.", max_new_tokens=6)], StopToken()
    )[0]
    assert engine.image_processor_calls == calls + 1
    turn = Turn("vqa", "Describe.", first.raw_output)
    follow = AnalysisInput(task="vqa", image=img, prompt="Which side?", history=(turn,), max_new_tokens=6)
    answer = engine.analyze_batch([follow], StopToken())[0]
    assert engine.image_processor_calls == calls + 1  # the follow-up used the cached pixel values
    assert first.raw_output == _greedy_from_processor(engine, [_user("Describe.", True)], arr, 6)
    conversation = [
        _user("Describe.", True),
        {"role": "assistant", "content": [{"type": "text", "text": first.raw_output}]},
        _user("Which side?", False),
    ]
    assert first.timings_ms["new_tokens"] >= 3 and answer.timings_ms["new_tokens"] >= 3  # not an empty answer
    assert answer.raw_output == _greedy_from_processor(engine, conversation, arr, 6)


def test_the_same_shown_pixels_with_slice_values_are_another_model_image(engine):
    """MedGemma sees the slice's values (CT: three HU windows) when they are sent: a request with the same shown PNG
    sent inline, first without values and then with them, must run the image processor on each model image, not
    answer the second from the first's cached pixel values."""
    import base64

    import requests
    from MiniGPTMedSlicerLib.png import encode_png

    from backend.server_thread import ServerThread

    arr = blob_image(size=64, seed=12)[:, :56]  # an image no other test sends
    hu = (arr.astype(np.int32) * 8).astype(np.uint16)  # stored values; HU = stored - 1024
    png = base64.b64encode(encode_png(arr)).decode()
    values = {"data": base64.b64encode(encode_png(hu)).decode(), "slope": 1.0, "intercept": -1024.0, "unit": "HU"}
    with ServerThread(engine) as url:
        calls = engine.image_processor_calls
        for body in ({}, {"values": values}):
            req = {"task": "vqa", "question": "Which side?", "image": png, "max_new_tokens": 2, **body}
            r = requests.post(f"{url}/v1/analyze", json=req, timeout=60)
            assert r.status_code == 200, r.text
        assert engine.image_processor_calls == calls + 2
