"""Exact texts, warnings and pixel boxes of MiniGPT-Med's answer parser (backend.minigpt.boxes), written out by hand
on a 200 x 100 image (make mutation, docs/testing.md)."""

from __future__ import annotations

import pytest

from backend.minigpt.boxes import parse_answer


def _boxes(res):
    return [(b.label, b.grid, b.box) for b in res.boxes]


def test_mixed_answer_text_boxes_and_warnings():
    res = parse_answer(
        "Left: <p> </p> {<10><20><30><40>}<delim>{<1><2><3>} and {<5><5><9><9>} and {<1,2,3,4>}.", 200, 100, "lesion"
    )
    assert _boxes(res) == [
        ("lesion", (10, 20, 30, 40), [20.0, 20.0, 60.0, 40.0]),  # an empty label is the default one
        ("lesion", (5, 5, 9, 9), [10.0, 5.0, 18.0, 9.0]),  # outside any group
    ]
    assert res.warnings == [
        "dropped box '{<1><2><3>}': expected 4 integers, found 3",
        "dropped box '{<1,2,3,4>}': not in the {<x1><y1><x2><y2>} form",
    ]
    assert res.text == "Left: lesion and and ."


@pytest.mark.parametrize(
    ("group", "warning"),
    [
        ("{<10>,<20>,<30>,<40>}", "dropped box '{<10>,<20>,<30>,<40>}': not in the <x1><y1><x2><y2> form"),
        ("{<1><2><3><4><5><6>}", "dropped box '{<1><2><3><4><5><6>}': expected 4 integers, found 5"),
        ("{<10><20><30><40>", "dropped box '{<10><20><30><40>': missing closing brace"),
        ("{<10><20><101><40>}", "dropped box '{<10><20><101><40>}': coordinates outside 0..100"),
        ("{<-1><20><30><40>}", "dropped box '{<-1><20><30><40>}': coordinates outside 0..100"),
        ("{<5><20><5><40>}", "dropped box '{<5><20><5><40>}': empty or inverted (need x1 < x2 and y1 < y2)"),
        ("{<5><40><9><40>}", "dropped box '{<5><40><9><40>}': empty or inverted (need x1 < x2 and y1 < y2)"),
    ],
)
def test_broken_boxes_in_a_group_are_dropped_with_one_warning(group, warning):
    res = parse_answer(f"<p>Mass</p> {group}", 200, 100, bare_box=True)
    assert res.boxes == [] and res.warnings == [warning]
    assert res.text == "Mass"


def test_grid_limits_are_inclusive_and_the_default_label_is_finding():
    res = parse_answer("{<0><0><100><100>} <p>a</p> {<99><0><100><1>}", 200, 100)
    assert _boxes(res) == [
        ("a", (99, 0, 100, 1), [198.0, 0.0, 200.0, 1.0]),
        ("finding", (0, 0, 100, 100), [0.0, 0.0, 200.0, 100.0]),
    ]
    assert res.warnings == [] and res.text == "a"


def test_stray_tags_and_spacing():
    res = parse_answer("a <delim> b </p>\t\tc <p> d\ne", 200, 100)
    assert res.boxes == [] and res.text == "a b c d\ne"


@pytest.mark.parametrize(
    ("answer", "grid"),
    [("10 20 30 40.", (10, 20, 30, 40)), ("[10, 20, 30, 40]", (10, 20, 30, 40)), (" (0;0;100;100) ", (0, 0, 100, 100))],
)
def test_bare_box_forms(answer, grid):
    res = parse_answer(answer, 200, 100, "nodule", bare_box=True)
    assert [(b.label, b.grid) for b in res.boxes] == [("nodule", grid)] and res.warnings == []
    assert res.boxes[0].box == [grid[0] * 2.0, float(grid[1]), grid[2] * 2.0, float(grid[3])]


def test_bare_box_broken_or_already_seen():
    res = parse_answer(" 30 20 10 40 ", 200, 100, bare_box=True)
    assert res.boxes == []
    assert res.warnings == ["dropped box '30 20 10 40': empty or inverted (need x1 < x2 and y1 < y2)"]
    res = parse_answer("{<10,20,30,40>}", 200, 100, bare_box=True)  # a brace in the wrong form is not a bare box
    assert res.boxes == [] and res.warnings == ["dropped box '{<10,20,30,40>}': not in the {<x1><y1><x2><y2>} form"]
    res = parse_answer("{<10><20><30><40>}", 200, 100, bare_box=True)  # one box, not two
    assert [b.grid for b in res.boxes] == [(10, 20, 30, 40)] and res.text == ""


def test_a_dropped_box_in_a_group_does_not_end_the_group():
    res = parse_answer("<p>a</p> {<1><2>{<10><20><30><40>}", 200, 100)
    assert _boxes(res) == [("a", (10, 20, 30, 40), [20.0, 20.0, 60.0, 40.0])] and res.text == "a"
    assert res.warnings == ["dropped box '{<1><2>': missing closing brace"]
    res = parse_answer("<p>a</p> {<1>,<2>,<3>,<4>}{<10><20><30><40>}", 200, 100)
    assert _boxes(res) == [("a", (10, 20, 30, 40), [20.0, 20.0, 60.0, 40.0])] and res.text == "a"
    assert res.warnings == ["dropped box '{<1>,<2>,<3>,<4>}': not in the <x1><y1><x2><y2> form"]


def test_boxes_outside_a_group_unclosed_broken_or_not_boxes():
    res = parse_answer("see {<10><20><30><40>", 200, 100)
    assert res.boxes == [] and res.text == "see"
    assert res.warnings == ["dropped box '{<10><20><30><40>': not in the {<x1><y1><x2><y2>} form"]
    res = parse_answer("see {<30><20><10><40>}", 200, 100)
    assert res.boxes == [] and res.text == "see"
    assert res.warnings == ["dropped box '{<30><20><10><40>}': empty or inverted (need x1 < x2 and y1 < y2)"]
    for answer in ("x {<abc} y", "x {abc>} y"):  # braces with only one angle bracket are text
        res = parse_answer(answer, 200, 100)
        assert res.boxes == [] and res.warnings == [] and res.text == answer
