"""Model output is untrusted input: every engine's findings pass through here before they leave the server."""

from __future__ import annotations

import math
import unicodedata

from MiniGPTMedSlicerLib.protocol import Finding

from .box_codecs import clip_box

MAX_FINDINGS = 100
MAX_LABEL_CHARS = 120
MAX_TEXT_CHARS = 20_000


def clean_text(s: object, limit: int) -> str:
    """Drop control characters (keep newlines and tabs), truncate to ``limit`` characters."""
    if not isinstance(s, str):
        s = "" if s is None else str(s)
    out = "".join(ch for ch in s if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    if len(out) > limit:
        out = out[: limit - 1] + "…"
    return out


def sanitize_findings(findings: list[Finding], width: int, height: int) -> tuple[list[Finding], list[str]]:
    """Clip boxes to the image, order corners, drop NaN/empty boxes, cap the count, clean labels.

    Returns the clean list and warnings describing what was dropped (empty when nothing was)."""
    out: list[Finding] = []
    dropped = 0
    for f in findings:
        box = clip_box(f.box, width, height)
        if box is None:
            dropped += 1
            continue
        score = f.score
        if score is not None:
            try:
                score = float(score)
            except (TypeError, ValueError):
                score = None
            if score is not None and not math.isfinite(score):
                score = None
        label = clean_text(f.label, MAX_LABEL_CHARS).strip().replace("\n", " ") or "finding"
        out.append(Finding(label=label, box=box, score=score))
    warnings: list[str] = []
    if dropped:
        warnings.append(
            f"{dropped} box(es) from the model were invalid (outside the image, empty or not numbers) and were dropped"
        )
    if len(out) > MAX_FINDINGS:
        warnings.append(f"the model returned {len(out)} boxes; only the first {MAX_FINDINGS} are kept")
        out = out[:MAX_FINDINGS]
    return out, warnings
