"""MiniGPT-Med box answers -> findings in pixels of the sent image.

Grammar (training data): ``<p>{label}</p> {<x1><y1><x2><y2>}``, several boxes of one label joined by ``<delim>``,
several labels joined by a space; integers on a 0..100 grid of the image's width/height. The original demo also
accepts a bare four-integer answer (refer mode): here only where the caller asked for a box (``bare_box``, the
ground/detect tasks) and only when the answer is nothing but the four integers (separators and brackets allowed),
so a report or VQA answer that mentions four numbers never becomes a box. Malformed output keeps its text; only
broken boxes are dropped, each with a warning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from backend.box_codecs import GRID, grid100_to_pixels

RE_LABELED = re.compile(r"<p>(.*?)</p>\s*((?:\{[^{}]*\}?\s*(?:<delim>\s*)?)+)", re.S)
RE_BRACE = re.compile(r"\{([^{}]*)\}?")
RE_BOX = re.compile(r"^\s*<\s*(-?\d+)\s*>\s*<\s*(-?\d+)\s*>\s*<\s*(-?\d+)\s*>\s*<\s*(-?\d+)\s*>\s*$")
RE_INT = re.compile(r"-?\d+")
_SEP = r"[\s{}<>\[\](),;]"
RE_BARE = re.compile(rf"^{_SEP}*(-?\d+){_SEP}+(-?\d+){_SEP}+(-?\d+){_SEP}+(-?\d+){_SEP}*\.?\s*$")
RE_TAGS = re.compile(r"</?p>|<delim>")


@dataclass
class ParsedBox:
    label: str
    grid: tuple[int, int, int, int]  # x1, y1, x2, y2 on the 0..100 grid
    box: list[float]  # pixels [x0, y0, x1, y1]


@dataclass
class ParsedAnswer:
    text: str  # the answer without box strings and tags
    boxes: list[ParsedBox] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def format_grid_box(g: tuple[int, int, int, int]) -> str:
    return "{" + "".join(f"<{v}>" for v in g) + "}"


def _check(vals: list[int], raw: str) -> tuple[tuple[int, int, int, int] | None, str | None]:
    if len(vals) != 4:
        return None, f"dropped box {raw!r}: expected 4 integers, found {len(vals)}"
    x1, y1, x2, y2 = vals
    if not all(0 <= v <= GRID for v in vals):
        return None, f"dropped box {raw!r}: coordinates outside 0..{GRID}"
    if not (x1 < x2 and y1 < y2):
        return None, f"dropped box {raw!r}: empty or inverted (need x1 < x2 and y1 < y2)"
    return (x1, y1, x2, y2), None


def parse_answer(
    answer: str, width: int, height: int, default_label: str = "finding", bare_box: bool = False
) -> ParsedAnswer:
    """Never raises for any string. ``bare_box``: the answer may be a bare four-integer box (ground/detect)."""
    res = ParsedAnswer(text="")
    label_spans: list[tuple[int, int, str]] = []
    seen_any = False
    for m in RE_LABELED.finditer(answer):
        seen_any = True
        label = m.group(1).strip() or default_label
        label_spans.append((m.start(), m.end(), label))
        for bm in RE_BRACE.finditer(m.group(2)):
            raw = bm.group(0)
            inner = bm.group(1)
            if not raw.endswith("}"):
                res.warnings.append(f"dropped box {raw!r}: missing closing brace")
                continue
            fm = RE_BOX.match(inner)
            vals = [int(v) for v in fm.groups()] if fm else [int(v) for v in RE_INT.findall(inner)][:5]
            if not fm and len(vals) == 4:
                res.warnings.append(f"dropped box {raw!r}: not in the <x1><y1><x2><y2> form")
                continue
            g, warn = _check(vals, raw)
            if g is None:
                res.warnings.append(warn or f"dropped box {raw!r}")
            else:
                res.boxes.append(ParsedBox(label, g, grid100_to_pixels(g, width, height)))
    # text with labeled box groups replaced by their labels
    parts, last = [], 0
    for s, e, label in label_spans:
        parts.append(answer[last:s])
        parts.append(f" {label} ")
        last = e
    parts.append(answer[last:])
    rest = "".join(parts)
    # boxes outside any <p>..</p> group
    for bm in list(RE_BRACE.finditer(rest)):
        raw = bm.group(0)
        fm = RE_BOX.match(bm.group(1)) if raw.endswith("}") else None
        if fm:
            seen_any = True
            g, warn = _check([int(v) for v in fm.groups()], raw)
            if g is None:
                res.warnings.append(warn or f"dropped box {raw!r}")
            else:
                res.boxes.append(ParsedBox(default_label, g, grid100_to_pixels(g, width, height)))
            rest = rest.replace(raw, " ", 1)
        elif "<" in raw and ">" in raw:
            seen_any = True
            res.warnings.append(f"dropped box {raw!r}: not in the {{<x1><y1><x2><y2>}} form")
            rest = rest.replace(raw, " ", 1)
    bare = RE_BARE.match(answer) if bare_box and not seen_any else None
    if bare:  # the demo's "refer" mode: an answer that is nothing but a box
        g, warn = _check([int(v) for v in bare.groups()], answer.strip())
        if g is None:
            res.warnings.append(warn or "dropped box")
        else:
            res.boxes.append(ParsedBox(default_label, g, grid100_to_pixels(g, width, height)))
    text = RE_TAGS.sub(" ", rest)
    res.text = re.sub(r"[ \t]+", " ", text).strip()
    return res
