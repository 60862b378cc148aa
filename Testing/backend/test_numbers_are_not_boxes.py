"""A number in a sentence is never a coordinate (issue 13 §1), for every family decoder: the peer families
(``families.decode_output``: MedGemma, Qwen2.5-VL, Qwen3-VL, MedMO, generic), MedMO's tag syntax and MiniGPT-Med's
answer parser. Boxes come only from each model's own box syntax; the same answers written in that syntax do give
their box (so a decoder that finds nothing at all fails here too)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend import families
from backend.families import ImageGeometry, decode_output
from backend.medmo_syntax import parse as parse_medmo
from backend.minigpt.boxes import parse_answer

W, H = 400, 300
PEER_FAMILIES = ("medgemma", "qwen2_5_vl", "qwen3_vl", "medmo", "generic")

#: model answers that mention numbers, none in a box syntax
PROSE = [
    "Two nodules of 4 mm and 6 mm, 12 and 25 mm from the pleura.",
    "Lesion at 120, 340, 560, 780 on the axial slice.",
    "Measurements: [12, 25, 40, 60] mm.",
    "Sizes {4, 6, 12, 25} mm, densities (30, 40, 50, 60) HU.",
    "The box_2d would be 100, 200, 300, 400 and the bbox_2d 10 20 30 40.",
    "bbox_2d: [10, 20, 30, 40]",
    "[[10, 20, 30, 40], [50, 60, 70, 80]]",
    '```json {"size_mm": [4, 6, 12, 25], "label": "nodule"} ```',
    '```json [{"label": "nodule", "position": [100, 200, 300, 400]}] ```',
    '```json [{"box_2d": ["100", "200", "300", "400"], "label": "text, not numbers"}] ```',
    '```json [{"bbox_2d": ["10", "20", "30", "40"], "label": "text, not numbers"}] ```',
    '```json [{"bbox_2d": [true, true, true, true], "box_2d": [true, true, true, true]}] ```',
    "Nodule <12><25><40><60> in the right lower lobe.",
    "Seen on slices 10 to 20, 30 to 40. <p>nodule</p> without a box.",
    "Answer: 10 20 30 40 mm",
    "box 1: 10, 20, 30, 40.",
]


def _geometry(family: str) -> ImageGeometry:
    g = ImageGeometry(width=W, height=H)
    if family == "medgemma":
        g.pad_left, g.pad_top = families.pad_offsets(W, H)
    if family == "qwen2_5_vl":
        g.model_height, g.model_width = 308, 420  # any resized frame
    return g


@pytest.mark.parametrize("family", PEER_FAMILIES)
@pytest.mark.parametrize("text", PROSE)
def test_peer_decoders_find_no_box_in_prose(family, text):
    d = decode_output(family, text, _geometry(family))
    assert d.findings == [], (family, text)
    assert d.text  # the words are kept


@pytest.mark.parametrize("text", PROSE)
def test_medmo_syntax_finds_no_box_in_prose(text):
    assert parse_medmo(text).boxes == []


@pytest.mark.parametrize("bare_box", [False, True])
@pytest.mark.parametrize("text", PROSE)
def test_minigptmed_parser_finds_no_box_in_prose(text, bare_box):
    """Even for ground/detect (``bare_box``), where an answer that is NOTHING but four integers is the demo's refer
    box, four integers inside a sentence are not a box."""
    assert parse_answer(text, W, H, bare_box=bare_box).boxes == []


# -- and the models' own syntax does give the box (expected pixels worked by hand for a 400 x 300 image) ---------

SYNTAX = {
    # [y0, x0, y1, x1] on 0..1000 of the 400 x 400 square (the image 50 rows down): x 40..200, y 70..230
    "medgemma": ('Final Answer: ```json [{"box_2d": [300, 100, 700, 500], "label": "nodule"}] ```', [40, 70, 200, 230]),
    # pixels of a 420 x 308 frame: x * 400/420, y * 300/308
    "qwen2_5_vl": ('```json [{"bbox_2d": [42, 77, 210, 154], "label": "nodule"}] ```', [40, 75, 200, 150]),
    "qwen3_vl": ('```json [{"bbox_2d": [100, 250, 500, 750], "label": "nodule"}] ```', [40, 75, 200, 225]),
    "medmo": ("nodule <box>[[100, 250, 500, 750]]</box>", [40, 75, 200, 225]),
}


@pytest.mark.parametrize("family", list(SYNTAX))
def test_peer_box_syntax_gives_its_box(family):
    text, want = SYNTAX[family]
    d = decode_output(family, "Two nodules of 4 mm and 6 mm. " + text, _geometry(family))
    assert [f.label for f in d.findings] == ["nodule"]
    assert np.allclose(d.findings[0].box, want, atol=1e-6)
    assert decode_output("generic", text, _geometry("generic")).findings == []  # generic: text only


def test_minigptmed_box_syntax_gives_its_box():
    a = parse_answer("Two nodules of 4 mm and 6 mm. <p>nodule</p> {<10><25><50><75>}", W, H)
    assert [(b.label, b.box) for b in a.boxes] == [("nodule", pytest.approx([40, 75, 200, 225]))]
    assert parse_answer("Seen at {<10><25><50><75>}.", W, H, default_label="mass").boxes[0].label == "mass"
    # the refer mode: nothing but four integers, and only where a box was asked for
    assert parse_answer("10 25 50 75", W, H, bare_box=True).boxes[0].box == pytest.approx([40, 75, 200, 225])
    assert parse_answer("10 25 50 75", W, H, bare_box=False).boxes == []


WORDS = st.sampled_from(["nodule", "mass", "mm", "HU", "at", "and", "slice", "left", "lobe", "size", "from", "of"])
NUMBER = st.integers(-50, 1200).map(str)
SEP = st.sampled_from([" ", ", ", " [", "] ", " (", ") ", "; ", ". ", " x "])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.one_of(WORDS, NUMBER, NUMBER), SEP), min_size=1, max_size=24), WORDS)
def test_sentences_of_words_and_numbers_never_give_a_box(pieces, word):
    """Any sentence of words, numbers, brackets and punctuation (at least one word) gives no box in any decoder."""
    text = word + " " + "".join(p + s for p, s in pieces)
    for family in PEER_FAMILIES:
        assert decode_output(family, text, _geometry(family)).findings == [], (family, text)
    assert parse_medmo(text).boxes == []
    assert parse_answer(text, W, H, bare_box=True).boxes == []
