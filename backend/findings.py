"""Model output is untrusted input: every engine's findings pass through here before they leave the server."""

from __future__ import annotations

import math
import unicodedata

from MiniGPTMedSlicerLib.protocol import Finding

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
        box = list(f.box) if isinstance(f.box, (list, tuple)) else []
        if len(box) != 4:
            dropped += 1
            continue
        try:
            x0, y0, x1, y1 = (float(c) for c in box)
        except (TypeError, ValueError):
            dropped += 1
            continue
        if not all(math.isfinite(c) for c in (x0, y0, x1, y1)):
            dropped += 1
            continue
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        x0, x1 = min(max(x0, 0.0), float(width)), min(max(x1, 0.0), float(width))
        y0, y1 = min(max(y0, 0.0), float(height)), min(max(y1, 0.0), float(height))
        if not (x1 > x0 and y1 > y0):
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
        out.append(Finding(label=label, box=[x0, y0, x1, y1], score=score))
    warnings: list[str] = []
    if dropped:
        warnings.append(
            f"{dropped} box(es) from the model were invalid (outside the image, empty or not numbers) and were dropped"
        )
    if len(out) > MAX_FINDINGS:
        warnings.append(f"the model returned {len(out)} boxes; only the first {MAX_FINDINGS} are kept")
        out = out[:MAX_FINDINGS]
    return out, warnings
