"""Exact labels, quads, warnings and texts of MedMO's box syntax (backend.medmo_syntax), written out by hand
(make mutation, docs/testing.md)."""

from __future__ import annotations

from backend.medmo_syntax import format_boxes, parse


def _boxes(a):
    return [(b.label, b.coords) for b in a.boxes]


def test_quoted_label_after_a_colon_and_bad_quads_counted_once():
    a = parse('Findings: "Mass" <box>[[1, 2, 3, 4], [5, 6, 7], [1,2,3,4,5]]</box>')
    assert _boxes(a) == [("Mass", [1.0, 2.0, 3.0, 4.0])]
    assert a.warnings == ["2 box(es) in the model's answer were not four numbers and were dropped"]
    assert a.text == 'Findings: "Mass"'


def test_list_punctuation_and_conjunctions_are_not_the_label():
    a = parse("Lesions:\n- and left nodule <box>[10, 20, 30, 40]</box>; * or right mass <box>[[1, 2, 3, 4]]</box>")
    assert _boxes(a) == [("left nodule", [10.0, 20.0, 30.0, 40.0]), ("right mass", [1.0, 2.0, 3.0, 4.0])]
    assert a.warnings == [] and a.text == "Lesions:\n- and left nodule; * or right mass"
    a = parse("Is it? Yes! **Cyst** <box>[-1.5, 2, 3.25, 4]</box>")
    assert _boxes(a) == [("Cyst", [-1.5, 2.0, 3.25, 4.0])] and a.text == "Is it? Yes! **Cyst**"


def test_cut_off_tag_empty_label_long_label_and_spacing():
    a = parse("Mass <box>[[1, 2, 3, 4]")
    assert _boxes(a) == [("Mass", [1.0, 2.0, 3.0, 4.0])] and a.text == "Mass"
    assert a.warnings == ["a <box> tag was not closed (answer cut off?); its complete boxes were kept"]
    a = parse("<box>[1, 2, 3, 4]</box>")
    assert _boxes(a) == [("", [1.0, 2.0, 3.0, 4.0])] and a.text == "" and a.warnings == []
    a = parse("x" * 130 + " <box>[1, 2, 3, 4]</box>")
    assert [b.label for b in a.boxes] == ["x" * 120]
    a = parse("a\t\tb. Mass <box>[1, 2, 3, 4]</box> .")
    assert a.text == "a b. Mass."


def test_format_rounds_each_coordinate():
    assert format_boxes([[1.6, 2, 3, 4], [5, 6, 7, 8.5]]) == "<box>[[2, 2, 3, 4], [5, 6, 7, 8]]</box>"


def test_label_with_leading_space_an_x_and_a_line_break():
    assert [b.label for b in parse("    A. Mass <box>[1, 2, 3, 4]</box>").boxes] == ["Mass"]
    assert [b.label for b in parse("Xanthoma <box>[1, 2, 3, 4]</box>").boxes] == ["Xanthoma"]
    a = parse("Mass. \n Cyst <box>[1, 2, 3, 4]</box>")
    assert _boxes(a) == [("Cyst", [1.0, 2.0, 3.0, 4.0])] and a.text == "Mass.\nCyst"
