"""Prompt template, legacy SentencePiece tokenisation, decoding, post-processing, preprocessing and the box parser."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from minigpt_fixtures import tiny_files
from PIL import Image

from backend.box_codecs import pixels_to_grid100 as pixels_to_grid
from backend.minigpt.boxes import format_grid_box, parse_answer
from backend.minigpt.preprocess import CLIP_MEAN, CLIP_STD, preprocess, resized_rgb
from backend.minigpt.tokenization import (
    MiniGPTTokenizer,
    build_prompt,
    postprocess_benchmark,
    postprocess_demo,
)


@pytest.fixture(scope="module")
def tok():
    return MiniGPTTokenizer(tiny_files().llama)


def test_template_and_double_bos_with_legacy_spacing(tok):
    prompt = build_prompt("[vqa] is there a mass?")
    assert prompt == "<s>[INST] <Img><ImageHere></Img> [vqa] is there a mass? [/INST]"
    seg0, seg1 = tok.prompt_segments(prompt)
    assert seg0[:2] == [1, 1]  # BOS added + the literal <s>
    pieces0 = [tok.sp.id_to_piece(i) for i in seg0[2:]]
    pieces1 = [tok.sp.id_to_piece(i) for i in seg1]
    assert pieces0[0] == "▁[" and "".join(pieces0) == "▁[INST]▁<Img>"  # dummy prefix after <s> (legacy)
    assert (
        pieces1[0].startswith("▁")
        and "".join(pieces1).replace("▁", " ").strip() == "</Img> [vqa] is there a mass? [/INST]"
    )
    assert 1 not in seg1  # only the first segment gets specials


def test_matches_transformers_legacy_true_not_the_folders_legacy_false(tok):
    from transformers import AutoTokenizer

    folder = str(tiny_files().llama)
    legacy = AutoTokenizer.from_pretrained(folder, legacy=True)
    modern = AutoTokenizer.from_pretrained(folder)  # tokenizer_config.json says legacy: false
    for instr in ("Describe this image in detail", "[detection] tumor", "[refer] where is the tumor?"):
        seg0, seg1 = tok.prompt_segments(build_prompt(instr))
        text0, text1 = build_prompt(instr).split("<ImageHere>")
        assert seg0 == legacy(text0).input_ids
        assert seg1 == legacy(text1, add_special_tokens=False).input_ids
        assert seg0 != modern(text0).input_ids  # the pitfall: '[' after <s> without '▁'


def test_decode_drops_specials_and_the_pad_token(tok):
    ids = [*tok.sp.encode("yes"), tok.pad_id, tok.eos_id, tok.bos_id, *tok.sp.encode("no")]
    assert tok.sp.id_to_piece(tok.pad_id) == "$$"
    assert tok.decode(ids) == "yes no"
    assert postprocess_benchmark("<s> foo [/INST] the answer </s> junk") == "the answer"
    assert postprocess_demo("Assistant: hello ### more") == "hello"


def test_preprocess_gray_to_rgb_squash_resize_clip_norm():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (60, 200), dtype=np.uint8)
    rgb = resized_rgb(gray, 448)
    assert rgb.shape == (448, 448, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    want = np.asarray(Image.fromarray(gray).convert("RGB").resize((448, 448), Image.BICUBIC))
    assert np.array_equal(rgb, want)
    x = preprocess(gray).numpy()
    assert x.shape == (3, 448, 448)
    for c in range(3):
        np.testing.assert_allclose(x[c], (want[..., c] / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c], atol=1e-5)


# ---- boxes ---------------------------------------------------------------------------------------------------------

CASES = [
    ("<p>tumor</p> {<10><20><30><40>}", [("tumor", [20.0, 20.0, 60.0, 40.0])], 0),
    (
        "<p>pneumonia</p> {<50><10><90><60>}<delim>{<5><5><25><35>}",
        [("pneumonia", [100.0, 10.0, 180.0, 60.0]), ("pneumonia", [10.0, 5.0, 50.0, 35.0])],
        0,
    ),
    (
        "<p>tumor</p> {<0><0><100><100>} <p>nodule</p> {<1><2><3><4>}",
        [("tumor", [0.0, 0.0, 200.0, 100.0]), ("nodule", [2.0, 2.0, 6.0, 4.0])],
        0,
    ),
    ("{<10><20><30><40>}", [("default", [20.0, 20.0, 60.0, 40.0])], 0),
    ("10 20 30 40", [("default", [20.0, 20.0, 60.0, 40.0])], 0),  # the demo's bare four-integer answer
    ("<p>tumor</p> {<10><20><30>}", [], 1),  # three numbers
    ("<p>tumor</p> {<10><20><130><40>}<delim>{<1><1><9><9>}", [("tumor", [2.0, 1.0, 18.0, 9.0])], 1),  # out of grid
    ("<p>tumor</p> {<30><20><10><40>}", [], 1),  # inverted
    ("<p>tumor</p> {<10><20><30><40>", [], 1),  # truncated
    ("no acute findings.", [], 0),
    ("1 2 3", [], 0),
]


@pytest.mark.parametrize(("answer", "boxes", "n_warn"), CASES)
def test_box_parser(answer, boxes, n_warn):
    res = parse_answer(answer, 200, 100, default_label="default", bare_box=True)  # as for ground/detect
    assert [(b.label, b.box) for b in res.boxes] == boxes
    assert len(res.warnings) == n_warn, res.warnings
    assert "{<" not in res.text and "<p>" not in res.text
    if not boxes and not n_warn:
        assert res.text == answer.strip()


@pytest.mark.parametrize(
    "answer",
    [
        "Two nodules of 4 mm and 6 mm, 12 and 25 mm from the pleura.",  # the report on a 512 x 512 image
        "nodule at 10 20 30 40",
        "10 20 30 40 mm",
    ],
)
def test_numbers_in_a_sentence_are_never_a_box(answer):
    for bare_box in (False, True):
        res = parse_answer(answer, 512, 512, default_label="tumor", bare_box=bare_box)
        assert res.boxes == [] and res.warnings == [] and res.text == answer


def test_bare_four_integers_only_for_ground_and_detect():
    assert parse_answer("10 20 30 40", 512, 512).boxes == []  # report/VQA: never a box
    res = parse_answer("{10, 20, 30, 40}", 200, 100, default_label="nodule", bare_box=True)
    assert [(b.label, b.box) for b in res.boxes] == [("nodule", [20.0, 20.0, 60.0, 40.0])]


def test_malformed_output_keeps_the_text():
    res = parse_answer("There is a mass <p>mass</p> {<10><x><30><40>} in the right lung.", 100, 100)
    assert res.boxes == [] and res.warnings
    assert res.text.startswith("There is a mass") and res.text.endswith("in the right lung.")


def test_grid_round_trip():
    assert pixels_to_grid((51.2, 0, 512, 256), 512, 512) == (10, 0, 100, 50)
    assert format_grid_box((10, 0, 100, 50)) == "{<10><0><100><50>}"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from([*list("<>{}p/01234589 -x"), "<p>", "</p>", "<delim>", "tumor", "100", "{<"]),
            st.tuples(*[st.integers(-5, 120)] * 4).map(lambda t: "{" + "".join(f"<{v}>" for v in t) + "}"),
            st.text(max_size=5),
        ),
        max_size=40,
    ).map("".join),
    st.integers(1, 4000),
    st.integers(1, 4000),
)
def test_box_parser_fuzz(answer, w, h):
    res = parse_answer(answer, w, h)
    for b in res.boxes:
        x0, y0, x1, y1 = b.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert all(0 <= v <= 100 for v in b.grid)
    assert isinstance(res.text, str)
