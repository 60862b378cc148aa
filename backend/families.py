"""Model families of the peer engines (``hf`` and ``openai``): one prompt per task, the image convention, and a box
decoder that returns findings in pixels of the image that was SENT to our backend.

| family       | image convention                         | box output                                                     |
|--------------|------------------------------------------|----------------------------------------------------------------|
| medgemma     | zero-padded to a square, then 896 px     | JSON ``box_2d`` = [y0, x0, y1, x1] on 0..1000 of the padded square |
| qwen2_5_vl   | Qwen's smart resize (multiples of 28)    | JSON ``bbox_2d`` = [x0, y0, x1, y1] in pixels of the resized image |
| qwen3_vl     | Qwen's smart resize                      | JSON ``bbox_2d`` = [x0, y0, x1, y1] on 0..1000                     |
| medmo        | Qwen's smart resize (MedMO is Qwen3-VL)  | ``Label <box>[[x0, y0, x1, y1], ...]</box>`` on 0..1000 (``medmo_syntax``) |
| generic      | as sent                                  | none (text only)                                               |

Thinking blocks (``<think>…</think>``, MedGemma's ``<unused94>…<unused95>``) are stripped. Malformed output keeps its
text; only broken boxes are dropped, each with a warning.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from MiniGPTMedSlicerLib.protocol import DETECT, GROUND, REPORT, TASKS, TEXT_TASKS, VQA, Finding

from .box_codecs import (
    box2d_to_pixels,
    norm1000_to_pixels,
    pad_offsets,
    pixels_to_box2d,
    pixels_to_norm1000,
    pixels_to_resized,
    resized_to_pixels,
)

FAMILIES = ("medgemma", "qwen2_5_vl", "qwen3_vl", "medmo", "generic")
#: the families with a box format (every one but generic), as the 501 messages name them
BOX_FAMILIES = tuple(f for f in FAMILIES if f != "generic")
#: families whose folders carry Qwen's image processor (smart resize, ``<|image_pad|>`` expanded by the engine)
QWEN_PROCESSOR_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "medmo")

_THINK = [
    re.compile(r"<think>.*?</think>", re.S),
    re.compile(r"<unused94>.*?(<unused95>|$)", re.S),
    re.compile(r"^.*?</think>", re.S),
]
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)

MEDGEMMA_BOX_CONTRACT = (
    "Instructions: The format of a bounding box is [y0, x0, y1, x1] where (y0, x0) is the top-left corner and (y1, x1) "
    "the bottom-right corner. Always normalize the coordinates to the range [0, 1000] of the image. You MUST output a "
    "single parseable json list of objects enclosed in ```json...``` brackets, for example "
    '```json [{"box_2d": [100, 200, 300, 400], "label": "right lung"}] ```. '
    "Left and right refer to the patient's left and right."
)
QWEN_BOX_CONTRACT = (
    'Output the result as a JSON list of objects, each with a "bbox_2d" [x1, y1, x2, y2] and a '
    '"label", in a ```json``` block.'
)


@dataclass
class ImageGeometry:
    """How the sent image (W x H) became the model's input: padded to a square, then resized."""

    width: int  # of the sent image
    height: int
    pad_left: int = 0
    pad_top: int = 0
    model_width: int = 0  # the resized image the model saw (Qwen2.5-VL boxes are in its pixels)
    model_height: int = 0

    @property
    def square(self) -> int:
        return max(self.width, self.height)


@dataclass
class Decoded:
    text: str
    findings: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return family


def supported_tasks(family: str) -> tuple[str, ...]:
    return TEXT_TASKS if family == "generic" else TASKS


def check_task(family: str, task: str) -> None:
    """Raise TaskNotSupported (HTTP 501) for a task this family cannot answer."""
    from .engines.base import TaskNotSupported

    if task not in supported_tasks(family):
        raise TaskNotSupported(
            f"task '{task}' needs a model family with boxes (--family {box_families_text()}); this engine is '{family}'"
        )


def box_families_text() -> str:
    """``medgemma, qwen2_5_vl, qwen3_vl or medmo``: the box families for a message."""
    return f"{', '.join(BOX_FAMILIES[:-1])} or {BOX_FAMILIES[-1]}"


def pad_to_square(img, g: ImageGeometry):
    """MedGemma's convention: zero-pad the PIL image symmetrically to a square; records the offsets in ``g``."""
    from PIL import Image

    g.pad_left, g.pad_top = pad_offsets(g.width, g.height)
    square = Image.new("RGB", (g.square, g.square))
    square.paste(img, (g.pad_left, g.pad_top))
    return square


#: MedGemma's CT convention (Google-Health/medgemma, high_dimensional_ct notebook): three HU windows packed into R, G, B.
MEDGEMMA_CT_WINDOWS_HU = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))


def medgemma_rgb(values, unit: str, volume_min: float | None = None, volume_max: float | None = None):
    """The image MedGemma was trained on, from the slice's scalar values (``AnalyzeRequest.values``): CT (unit HU)
    as three windows in R/G/B (R -1024..1024, G -135..215, B 0..80 HU; clip, scale to 0..255, round); anything else
    (MR) min-max normalised over the whole acquisition (the volume's min/max; the slice's when not sent) and
    replicated to R=G=B. (H, W, 3) uint8."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if unit == "HU":
        chans = [np.round((np.clip(v, lo, hi) - lo) / (hi - lo) * 255.0) for lo, hi in MEDGEMMA_CT_WINDOWS_HU]
        return np.stack(chans, axis=2).astype(np.uint8)
    lo = float(volume_min) if volume_min is not None else float(v.min())
    hi = float(volume_max) if volume_max is not None else float(v.max())
    g = np.round((np.clip(v, lo, hi) - lo) / (hi - lo) * 255.0) if hi > lo else np.zeros_like(v)
    return np.repeat(g.astype(np.uint8)[:, :, None], 3, axis=2)


QWEN_MAX_PIXELS = 28 * 28 * 16384  # Qwen2.5-VL's preprocessor_config default (12845056)
QWEN_SEND_MAX_PIXELS = 28 * 28 * 1280  # what the openai engine sends at most (~1 MP, 1280 image tokens)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = QWEN_MAX_PIXELS
) -> tuple[int, int]:
    """Qwen2-VL/2.5-VL's resize: both sides multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / max(1, min(height, width)) > 200:
        raise ValueError("aspect ratio too extreme for Qwen's resize")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


XRAY_MODALITIES = ("XR", "CR", "DX", "DR", "RG", "PX", "MG")

#: What a detect looks for when the question names nothing, per model family and modality ("*": any other).
#: MiniGPT-Med was trained on "tumor" (CT/MR) and "pneumonia" (X-ray) detection; the peer families get a neutral word.
DETECT_LABELS: dict[str, dict[str, str]] = {
    "minigptmed": {**{m: "pneumonia" for m in XRAY_MODALITIES}, "*": "tumor"},
    "*": {"MR": "lesion", "MRI": "lesion", "*": "abnormality"},
}


def default_detect_label(family: str, modality: str | None) -> str:
    table = DETECT_LABELS.get(family, DETECT_LABELS["*"])
    return table.get((modality or "").upper(), table["*"])


def prompt_for(
    family: str,
    task: str,
    question: str | None,
    region: tuple[float, float, float, float] | None,
    geometry: ImageGeometry,
    modality: str | None = None,
) -> str:
    """The instruction text for one task (the request's ``prompt`` field, when given, replaces it upstream)."""
    if family == "medmo":
        return medmo_prompt(task, question, region, geometry, modality)
    q = (question or "").strip()
    kind = f"{modality} " if modality else ""
    if task == REPORT.id:
        return (
            f"Describe this {kind}image in detail and list the findings."
            if kind
            else "Describe this medical image in detail and list the findings."
        )
    if task == VQA.id:
        return q
    if family == "generic":
        raise ValueError(f"the generic family has no box format, so '{task}' is not available")
    if task == DETECT.id:
        target = q or default_detect_label(family, modality)
        what = f"every {target}"
    elif task == GROUND.id:
        what = f"the {q}" if not q.lower().startswith(("the ", "a ", "an ")) else q
    else:  # identify: describe the region, give its box back
        assert region is not None
        box = encode_box(family, region, geometry)
        coords = json.dumps([round(v) for v in box])
        key = "box_2d" if family == "medgemma" else "bbox_2d"
        return (
            f"What is in the region {key} {coords}? Describe it in one sentence, then output it as a JSON list with "
            f'one object with "{key}" {coords} and a short "label". '
            + (MEDGEMMA_BOX_CONTRACT if family == "medgemma" else QWEN_BOX_CONTRACT)
        )
    if family == "medgemma":
        return (
            f"{MEDGEMMA_BOX_CONTRACT}\nQuery: Where is {what}? Output the final answer in the format "
            '"Final Answer: X" where X is a JSON list of objects. The object needs a "box_2d" and "label" key. Answer:'
        )
    return f"Locate {what} in the image. {QWEN_BOX_CONTRACT}"


def encode_box(family: str, box: tuple[float, float, float, float], g: ImageGeometry) -> list[float]:
    """A box in sent-image pixels -> the family's coordinates (for prompts that name a region)."""
    if family == "medgemma":
        return pixels_to_box2d(box, g.width, g.height)
    if family == "qwen2_5_vl":
        return pixels_to_resized(box, g.width, g.height, g.model_width, g.model_height)
    return pixels_to_norm1000(box, g.width, g.height)


def decode_box(family: str, coords: list, g: ImageGeometry) -> list[float]:
    """The family's coordinates -> [x0, y0, x1, y1] in sent-image pixels (not yet clipped)."""
    if len(coords) != 4:
        raise ValueError("a box has four coordinates")
    if family == "medgemma":  # [y0, x0, y1, x1] on 0..1000 of the padded square
        return box2d_to_pixels(coords, g.width, g.height)
    if family == "qwen2_5_vl":  # absolute pixels of the resized image
        return resized_to_pixels(coords, g.width, g.height, g.model_width, g.model_height)
    return norm1000_to_pixels(coords, g.width, g.height)  # qwen3_vl, medmo (0..1000 of the image)


def strip_thinking(text: str) -> str:
    for pat in _THINK[:2]:
        text = pat.sub("", text)
    if "</think>" in text:  # a template that opened the block in the prompt
        text = _THINK[2].sub("", text)
    return text.strip()


def _json_candidates(text: str) -> list[str]:
    tail = text.split("Final Answer:", 1)[1] if "Final Answer:" in text else text
    found = [m.group(1) for m in _FENCE.finditer(tail)]
    if not found:  # no fence (or a cut-off one): the outermost [...] or {...}
        start = min([i for i in (tail.find("["), tail.find("{")) if i >= 0], default=-1)
        if start >= 0:
            found.append(tail[start:])
    return found


def _loads_lenient(s: str):
    s = s.strip()
    for end in range(len(s), 0, -1):  # tolerate trailing junk after the JSON value
        if s[end - 1] not in "]}":
            continue
        try:
            return json.loads(s[:end])
        except ValueError:
            continue
    if s.startswith("["):  # a list cut off (max_tokens reached): keep its complete objects
        for end in range(len(s), 0, -1):
            if s[end - 1] == "}":
                try:
                    return json.loads(s[:end] + "]")
                except ValueError:
                    continue
    raise ValueError("no JSON value")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def decode_output(family: str, raw: str, g: ImageGeometry, default_label: str = "finding") -> Decoded:
    """Model text -> (text for the user, findings in sent-image pixels, warnings). Never raises."""
    text = strip_thinking(raw if isinstance(raw, str) else str(raw))
    if family == "generic":
        return Decoded(text=text)
    if family == "medmo":
        return decode_medmo(text, g, default_label)
    key = "box_2d" if family == "medgemma" else "bbox_2d"
    findings: list[Finding] = []
    warnings: list[str] = []
    objects: list = []
    for cand in _json_candidates(text):
        try:
            value = _loads_lenient(cand)
        except ValueError:
            warnings.append("the model's JSON could not be parsed; its boxes were dropped")
            continue
        objects.extend(value if isinstance(value, list) else [value])
        break
    dropped = 0
    for obj in objects:
        if not isinstance(obj, dict) or key not in obj:
            dropped += 1
            continue
        coords = obj.get(key)
        try:
            if not isinstance(coords, (list, tuple)) or len(coords) != 4 or not all(map(_is_number, coords)):
                raise ValueError  # only JSON numbers are coordinates: not "120" (text), not true
            box = decode_box(family, list(coords), g)
            if not all(math.isfinite(v) for v in box):
                raise ValueError
        except (TypeError, ValueError, ZeroDivisionError):
            dropped += 1
            continue
        label = obj.get("label")
        findings.append(
            Finding(
                label=str(label) if label else default_label,
                box=box,
                score=obj.get("score") if _is_number(obj.get("score")) else None,
            )
        )
    if dropped:
        warnings.append(f"{dropped} object(s) in the model's answer had no usable {key} and were dropped")
    shown = text.split("Final Answer:", 1)[0].strip() if "Final Answer:" in text else _FENCE.sub("", text).strip()
    if not shown and findings:
        shown = ", ".join(f.label for f in findings)
    return Decoded(text=shown or text, findings=findings, warnings=warnings)


def uses_qwen_processor(family: str) -> bool:
    return family in QWEN_PROCESSOR_FAMILIES


# -- MedMO (Qwen3-VL fine-tune; prompts from genmilab/MedMO README.md @ 4a9f45d where it has one) ------------------

MEDMO_DETECT_ALL = "Detect and localize all abnormalities in this image."  # README, verbatim


def medmo_prompt(
    task: str,
    question: str | None,
    region: tuple[float, float, float, float] | None,
    geometry: ImageGeometry,
    modality: str | None = None,
) -> str:
    """MedMO's instruction per task: the README's report and localisation prompts; ground, a targeted detect and
    identify in the same form (our wording: MedMO publishes none for them)."""
    from .medmo_syntax import format_boxes

    q = (question or "").strip()
    if task == REPORT.id:  # README: "Generate a detailed radiology report for this CT scan."
        return (
            f"Generate a detailed radiology report for this {modality} scan."
            if modality
            else ("Generate a detailed radiology report for this image.")
        )
    if task == VQA.id:
        return q
    if task == DETECT.id:
        return f"Detect and localize {q} in this image." if q else MEDMO_DETECT_ALL
    if task == GROUND.id:
        return f"Detect and localize {q} in this image."
    assert region is not None
    box = format_boxes([encode_box("medmo", region, geometry)])
    return f"What is shown in the region {box}? Answer with its label and box."


def decode_medmo(text: str, g: ImageGeometry, default_label: str) -> Decoded:
    """``Label <box>[[x0, y0, x1, y1], ...]</box>`` (0..1000 of the image) -> findings in sent-image pixels; every
    box of a label keeps that label; a box without text before it gets ``default_label``."""
    from .medmo_syntax import parse

    ans = parse(text)
    findings: list[Finding] = []
    dropped = 0
    for b in ans.boxes:
        box = decode_box("medmo", b.coords, g)
        if not all(math.isfinite(v) for v in box):
            dropped += 1
            continue
        findings.append(Finding(label=b.label or default_label, box=box))
    warnings = list(ans.warnings)
    if dropped:
        warnings.append(f"{dropped} box(es) in the model's answer were not finite and were dropped")
    shown = ans.text or ", ".join(dict.fromkeys(f.label for f in findings))
    return Decoded(text=shown or text, findings=findings, warnings=warnings)
