"""MiniGPT-Med conversations in the engine: the two-turn prompt's token ids against an independent construction of
``CONV_VISION_minigptv2``, the image-embedding cache (hits skip the vision encoder, LRU eviction), left truncation,
streaming deltas from the decode loop and a cancelled batch row, on the tiny offline model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from minigpt_fixtures import _training_images, tiny_files

from backend.engines.base import AnalysisInput, DecodedImage, StopToken, Turn
from backend.engines.minigptmed import MiniGPTMedEngine, _Item
from backend.minigpt.generate import GREEDY
from backend.settings import MiniGPTMedSettings


def _engine(**kw) -> MiniGPTMedEngine:
    t = tiny_files()
    e = MiniGPTMedEngine(
        MiniGPTMedSettings(
            eva=str(t.eva), llama=str(t.llama), checkpoint=str(t.checkpoint), model_config=str(t.model_config), **kw
        )
    )
    e.load()
    return e


@pytest.fixture(scope="module")
def engine():
    return _engine()


def _img(k: int) -> DecodedImage:
    return DecodedImage(_training_images()[k], "PNG")


class _CountingEncoder:
    """Wraps the real model's encode_images and counts the images it sees."""

    def __init__(self, engine: MiniGPTMedEngine):
        self.inner = engine.model.encode_images
        self.images = 0
        engine.model.encode_images = self

    def __call__(self, pixels):
        self.images += int(pixels.shape[0])
        return self.inner(pixels)


def test_two_turn_prompt_ids_equal_an_independent_construction(engine):
    sp = engine.tokenizer.sp
    bos = sp.bos_id()
    q1, a1, q2 = "[vqa] is there a mass?", "yes", "[refer] nodule"
    # the template, built here from its parts: roles "<s>[INST] " and " [/INST]", sep "", system ""; the literal <s>
    # is the BOS id; each text piece between specials is SentencePiece-encoded on its own (legacy: dummy prefix)
    seg0 = [bos, bos, *sp.encode("[INST] <Img>")]
    seg1 = [*sp.encode(f"</Img> {q1} [/INST]{a1}"), bos, *sp.encode(f"[INST] {q2} [/INST]")]
    item = _Item(
        AnalysisInput(task="ground", image=_img(0), question="nodule", history=(Turn("vqa", "is there a mass?", a1),)),
        q2,
        "nodule",
        "k",
        20,
        GREEDY,
    )
    image_emb = torch.randn(engine.cfg.image_tokens, engine.model.llm.config.hidden_size)
    with torch.inference_mode():
        got = engine._embed_prompt(item, image_emb)
        want = torch.cat(
            [engine.model.embed_tokens(torch.tensor(seg0)), image_emb, engine.model.embed_tokens(torch.tensor(seg1))]
        )
    assert got.shape == want.shape and torch.equal(got, want)
    assert seg1.count(bos) == 1 and seg1[len(sp.encode(f"</Img> {q1} [/INST]{a1}"))] == bos
    assert item.warnings == []


def test_follow_up_hits_the_cache_and_eviction_re_encodes():
    e = _engine(cache_size=1)
    enc = _CountingEncoder(e)
    a, b = _img(0), _img(1)
    first = e.analyze_batch([AnalysisInput(task="vqa", image=a, question="is there a mass?")], StopToken())[0]
    turn = Turn("vqa", "is there a mass?", first.raw_output)
    e.analyze_batch([AnalysisInput(task="report", image=a, history=(turn,))], StopToken())
    assert enc.images == 1  # the follow-up skipped the vision encoder
    e.analyze_batch([AnalysisInput(task="report", image=b)], StopToken())
    assert enc.images == 2 and e._cache.state(a.content_id()) == "evicted"
    e.analyze_batch([AnalysisInput(task="report", image=a)], StopToken())
    assert enc.images == 3


def test_cache_bytes_bound():
    e = _engine(cache_size=10, cache_bytes=1)  # no embedding fits: every request encodes
    enc = _CountingEncoder(e)
    for _ in range(2):
        e.analyze_batch([AnalysisInput(task="report", image=_img(0))], StopToken())
    assert enc.images == 2 and len(e._cache) == 0


def test_long_conversation_is_cut_from_the_left_with_a_warning(engine):
    turns = tuple(Turn("vqa", "is there a mass?", "yes " * 300) for _ in range(6))
    r = engine.analyze_batch(
        [AnalysisInput(task="vqa", image=_img(0), question="is there a mass?", history=turns, max_new_tokens=8)],
        StopToken(),
    )[0]
    assert any("2000-token context" in w for w in r.warnings)
    assert r.timings_ms["prompt_tokens"] == 2000 - 8


def test_streaming_deltas_add_up_and_a_cancelled_row_is_dropped(engine):
    deltas: list[str] = []
    gone = threading.Event()
    img = _img(0)
    solo = engine.analyze_batch([AnalysisInput(task="report", image=img)], StopToken())[0]
    rows = [
        AnalysisInput(task="report", image=img, on_text=deltas.append),
        AnalysisInput(task="vqa", image=img, question="is there a mass?", cancelled=gone),
    ]
    steps = 0

    def count(t):
        nonlocal steps
        steps += 1
        if steps == 2:
            gone.set()  # cancel the second row mid-decode
        deltas.append(t)

    rows[0].on_text = count
    out = engine.analyze_batch(rows, StopToken())
    assert len(deltas) >= 2 and "".join(deltas) == out[0].raw_output == solo.raw_output
    assert out[1].cancelled and out[1].text == ""
    assert not out[0].cancelled and out[0].text == solo.text


def test_all_rows_cancelled_frees_the_engine_within_a_step(engine):
    gone = threading.Event()
    seen = []

    def on_text(t):
        seen.append(t)
        gone.set()

    r = engine.analyze_batch(
        [AnalysisInput(task="report", image=_img(2), on_text=on_text, cancelled=gone, max_new_tokens=200)],
        StopToken(),
    )[0]
    assert r.cancelled and len(seen) == 1


def test_multibyte_text_is_never_split():
    from backend.engines.text_stream import DeltaText

    out: list[str] = []
    d = DeltaText(out.append)
    for partial in ["", "a", "a\ufffd", "a\u00e9", "a\u00e9 \ufffd\ufffd", "a\u00e9 \u6771"]:
        d.update(partial)
    d.finish("a\u00e9 \u6771")
    assert out == ["a", "\u00e9", " ", "\u6771"] and all("\ufffd" not in s for s in out)
    assert np.array_equal(np.array(list("".join(out))), np.array(list("a\u00e9 \u6771")))


def test_a_cancelled_row_no_longer_keeps_the_decode_loop_going(engine):
    """As in the hf engine: the cancelled row counts as finished, so the loop ends when the kept row is done (within
    the loop's check interval of 8 steps), not when the cancelled row would have ended (its report runs 19 tokens)."""
    img = _img(1)
    keep = dict(task="vqa", image=img, question="is there a mass?", max_new_tokens=6)
    drop = dict(task="report", image=img, max_new_tokens=300)
    solo = engine.analyze_batch([AnalysisInput(**keep)], StopToken())[0]
    assert solo.timings_ms["new_tokens"] < 6  # the kept row ends by itself, early
    gone = threading.Event()
    calls = 0

    def hook(module, args, output):
        nonlocal calls
        calls += 1
        if calls == 3:  # the prefill and two decode steps, then the cancel
            gone.set()

    handle = engine.model.llm.register_forward_hook(hook)
    try:
        out = engine.analyze_batch([AnalysisInput(**keep), AnalysisInput(**drop, cancelled=gone)], StopToken())
    finally:
        handle.remove()
    assert out[0].raw_output == solo.raw_output and out[1].cancelled
    assert calls <= 1 + 8, calls  # 24 before the change: the loop ran on until the cancelled report's own end
