"""MedMO's box syntax, read and written (pure text; the coordinate convention lives in ``backend.box_codecs``).

MedMO (``MBZUAI/MedMO-4B`` / ``-8B``, Qwen3-VL based) answers a localisation request with the label text followed by
all of its boxes in one tag (``genmilab/MedMO`` README.md @ 4a9f45d, "Disease Localization" example)::

    Fractures <box>[[156, 516, 231, 607], [240, 529, 296, 581]]</box>

* one ``<box>…</box>`` per label, holding a list of ``[x0, y0, x1, y1]`` quads (a single bare quad is read too);
* the label is the text before the tag, back to the previous tag or the start of the clause it stands in
  (``Fractures``; in ``The scan shows a mass. Mass <box>…`` it is ``Mass``);
* a tag cut off by the token limit keeps its complete quads; a quad that is not four numbers is dropped, with a
  warning each time.

The shown text is the answer with the tags taken out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BOX_OPEN, BOX_CLOSE = "<box>", "</box>"
_NUM = r"-?\d+(?:\.\d+)?"
_QUAD = re.compile(r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\]")
_INNER_LIST = re.compile(r"\[[^\[\]]*\]")
_TAG = re.compile(re.escape(BOX_OPEN) + r"(.*?)(" + re.escape(BOX_CLOSE) + r"|$)", re.S)
_CLAUSE_END = re.compile(r"(?:[.;:!?](?:\s|$)|\n)")
_LEAD = re.compile(r"^(?:[\s,;:\-–—*]+|and\s+|or\s+)+", re.I)


@dataclass
class Labelled:
    label: str  # "" when the model wrote no text before the tag
    coords: list[float]  # [x0, y0, x1, y1] as written (MedMO's 0..1000 frame)


@dataclass
class MedmoAnswer:
    text: str  # the answer without its tags
    boxes: list[Labelled] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _label_before(text: str) -> str:
    """The label of a tag: the last clause of the text before it, without list punctuation."""
    cut = 0
    for m in _CLAUSE_END.finditer(text.rstrip()):
        cut = m.end()
    label = _LEAD.sub("", text[cut:]).strip().strip("\"'`*").strip()
    return label[:120]


def parse(answer: str) -> MedmoAnswer:
    """MedMO answer text -> labelled quads as written (never raises)."""
    boxes: list[Labelled] = []
    warnings: list[str] = []
    pieces: list[str] = []
    last = 0
    bad = 0
    for m in _TAG.finditer(answer):
        before = answer[last : m.start()]
        pieces.append(before)
        label = _label_before(before)
        inner, closed = m.group(1), bool(m.group(2))
        for lst in _INNER_LIST.findall(inner):
            q = _QUAD.fullmatch(lst.strip())
            if q is None:
                bad += 1
                continue
            boxes.append(Labelled(label=label, coords=[float(v) for v in q.groups()]))
        if not closed:
            warnings.append(f"a {BOX_OPEN} tag was not closed (answer cut off?); its complete boxes were kept")
        last = m.end()
    pieces.append(answer[last:])
    if bad:
        warnings.append(f"{bad} box(es) in the model's answer were not four numbers and were dropped")
    text = re.sub(r"[ \t]+", " ", "".join(pieces))
    text = re.sub(r" +([,.;:!?])", r"\1", re.sub(r" *\n *", "\n", text)).strip()
    return MedmoAnswer(text=text, boxes=boxes, warnings=warnings)


def format_boxes(quads: list[list[float]]) -> str:
    """``<box>[[x0, y0, x1, y1], ...]</box>`` with integers, as MedMO writes it."""
    inner = ", ".join("[" + ", ".join(str(round(v)) for v in q) + "]" for q in quads)
    return f"{BOX_OPEN}[{inner}]{BOX_CLOSE}"
