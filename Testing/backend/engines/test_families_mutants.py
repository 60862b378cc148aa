"""backend/families.py, sharp enough for mutation testing (``make mutation``): every expected value is written out by
hand here (the arithmetic in the comments), on non-square images, never computed with the function under test.

Prompts are the texts of docs/peer-models.md (MedGemma's localisation notebook, Qwen's ``bbox_2d`` JSON, MedMO's
README), character for character; boxes land where the family's convention puts them (MedGemma's pad on either axis,
Qwen2.5-VL's smart resize on images that are not multiples of 28, 0..1000 for Qwen3-VL and MedMO)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from backend import families as F
from backend.engines.base import TaskNotSupported
from backend.families import ImageGeometry, decode_output

MEDGEMMA_CONTRACT = (
    "Instructions: The format of a bounding box is [y0, x0, y1, x1] where (y0, x0) is the top-left corner and (y1, x1) "
    "the bottom-right corner. Always normalize the coordinates to the range [0, 1000] of the image. You MUST output a "
    "single parseable json list of objects enclosed in ```json...``` brackets, for example "
    '```json [{"box_2d": [100, 200, 300, 400], "label": "right lung"}] ```. '
    "Left and right refer to the patient's left and right."
)
QWEN_CONTRACT = (
    'Output the result as a JSON list of objects, each with a "bbox_2d" [x1, y1, x2, y2] and a "label", in a '
    "```json``` block."
)
MEDGEMMA_QUERY_TAIL = (
    'Output the final answer in the format "Final Answer: X" where X is a JSON list of objects. The object needs a '
    '"box_2d" and "label" key. Answer:'
)

# a portrait image that is not a multiple of 28: 215 x 390; Qwen's smart resize makes it 224 x 392
# (390 / 28 = 13.9 -> 14 * 28 = 392, 215 / 28 = 7.68 -> 8 * 28 = 224)
PORTRAIT = ImageGeometry(width=215, height=390, pad_left=87, pad_top=0, model_width=224, model_height=392)
REGION = (30.0, 40.0, 130.0, 250.0)


def _at(d, expected) -> bool:
    """The decoded boxes are exactly ``expected`` (to float rounding), in order."""
    got = [list(f.box) for f in d.findings]
    return len(got) == len(expected) and bool(np.allclose(got, expected)) if expected else got == []


# -- families, tasks ---------------------------------------------------------------------------------


def test_family_and_task_checks():
    assert F.check_family("qwen3_vl") == "qwen3_vl"
    with pytest.raises(ValueError) as e:
        F.check_family("qwen")
    assert str(e.value) == "unknown family 'qwen'; choose one of medgemma, qwen2_5_vl, qwen3_vl, medmo, generic"
    assert F.supported_tasks("generic") == ("report", "vqa")
    assert F.supported_tasks("medgemma") == ("report", "vqa", "detect", "ground", "identify")
    F.check_task("generic", "vqa")
    F.check_task("medmo", "identify")
    with pytest.raises(TaskNotSupported) as e2:
        F.check_task("generic", "detect")
    assert str(e2.value) == (
        "task 'detect' needs a model family with boxes (--family medgemma, qwen2_5_vl, qwen3_vl or medmo); "
        "this engine is 'generic'"
    )
    assert [F.uses_qwen_processor(f) for f in ("medgemma", "qwen2_5_vl", "qwen3_vl", "medmo", "generic")] == [
        False,
        True,
        True,
        True,
        False,
    ]


# -- MedGemma's square pad and RGB windows ---------------------------------------------------------------


@pytest.mark.parametrize("w,h,left,top", [(3, 7, 2, 0), (6, 3, 0, 1)])
def test_pad_to_square_pastes_the_image_centred(w, h, left, top):
    a = (np.arange(w * h * 3, dtype=np.uint8).reshape(h, w, 3) + 1) * 5  # every pixel nonzero and distinct
    g = ImageGeometry(width=w, height=h)
    out = F.pad_to_square(Image.fromarray(a), g)
    assert (g.pad_left, g.pad_top) == (left, top) and g.square == max(w, h)
    o = np.asarray(out)
    assert out.mode == "RGB" and o.shape == (max(w, h), max(w, h), 3)
    assert np.array_equal(o[top : top + h, left : left + w], a)
    o2 = o.copy()
    o2[top : top + h, left : left + w] = 0
    assert not o2.any()  # the padding is zero


def test_medgemma_rgb_ct_windows_by_hand():
    hu = np.array([[-2000, -1024, -500, 0], [40, 60, 100, 3000]], dtype=np.float32)
    rgb = F.medgemma_rgb(hu, "HU")
    assert rgb.shape == (2, 4, 3) and rgb.dtype == np.uint8
    # R: (v + 1024) / 2048 * 255, rounded half to even: -500 -> 65.2, 0 -> 127.5 -> 128, 40 -> 132.48 -> 132,
    #    60 -> 134.97 -> 135, 100 -> 139.95 -> 140
    assert rgb[:, :, 0].tolist() == [[0, 0, 65, 128], [132, 135, 140, 255]]
    # G: (v + 135) / 350 * 255: 0 -> 98.4, 40 -> 127.5 -> 128, 60 -> 142.07, 100 -> 171.2
    assert rgb[:, :, 1].tolist() == [[0, 0, 0, 98], [128, 142, 171, 255]]
    # B: v / 80 * 255: 40 -> 127.5 -> 128, 60 -> 191.25
    assert rgb[:, :, 2].tolist() == [[0, 0, 0, 0], [128, 191, 255, 255]]
    # in double precision, as the notebook's float arithmetic: float32 -345.349 is -345.3489990; (v + 1024) / 2048 * 255
    # = 84.50011 -> 85 (in float32 arithmetic it would be 84.5 -> 84)
    assert F.medgemma_rgb(np.array([[-345.349]], dtype=np.float32), "HU")[0, 0, 0] == 85


def test_medgemma_rgb_mr_min_max_of_the_volume_or_the_slice():
    v = np.array([[10, 20, 30], [50, -5, 150]], dtype=np.float32)
    # over the volume's 0..100: 10 -> 25.5 -> 26, 20 -> 51, 30 -> 76.5 -> 76, 50 -> 127.5 -> 128, clipped at 0 and 255
    full = F.medgemma_rgb(v, "raw", 0.0, 100.0)
    assert full.shape == (2, 3, 3) and full.dtype == np.uint8
    for c in range(3):
        assert full[:, :, c].tolist() == [[26, 51, 76], [128, 0, 255]]
    # no range sent: the slice's own -5..150: (v + 5) / 155 * 255; 10 -> 24.7, 20 -> 41.1, 30 -> 57.6, 50 -> 90.5
    own = F.medgemma_rgb(v, "raw")
    assert own[:, :, 1].tolist() == [[25, 41, 58], [90, 0, 255]]
    # only the minimum sent: 0 .. the slice's 150; only the maximum: the slice's -5 .. 50
    assert F.medgemma_rgb(v, "raw", 0.0, None)[:, :, 2].tolist() == [[17, 34, 51], [85, 0, 255]]
    assert F.medgemma_rgb(v, "raw", None, 50.0)[:, :, 0].tolist() == [[70, 116, 162], [255, 0, 255]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant slice: black, not a division by zero (0 / 0 warns)
        flat = F.medgemma_rgb(np.full((2, 3), 7.0), "raw")
        assert F.medgemma_rgb(v, "raw", 30.0, 30.0).tolist() == np.zeros((2, 3, 3)).tolist()
    assert flat.shape == (2, 3, 3) and flat.dtype == np.uint8 and not flat.any()


# -- Qwen's smart resize -----------------------------------------------------------------------------------


def test_smart_resize_by_hand():
    assert F.smart_resize(390, 215) == (392, 224)  # 13.9 -> 14, 7.68 -> 8 (rounded, not floored)
    assert F.smart_resize(300, 500) == (308, 504)  # 10.7 -> 11, 17.9 -> 18
    assert F.smart_resize(290, 410) == (280, 420)  # 10.4 -> 10, 14.6 -> 15
    assert F.smart_resize(56, 56) == (56, 56)  # exactly the default min_pixels 56 * 56: kept
    assert F.smart_resize(3584, 3584) == (3584, 3584)  # exactly the default max_pixels 28 * 28 * 16384: kept
    # above it: beta = sqrt(3700 * 3600 / 12845056) = 1.0183; floor(3700 / beta / 28) = 129, floor(3600 / ...) = 126
    assert F.smart_resize(3700, 3600) == (3612, 3528)
    # above max_pixels 78400: beta = sqrt(2e6 / 78400) = 5.05; floor(7.07) = 7 -> 196, floor(14.1) = 14 -> 392
    assert F.smart_resize(1000, 2000, max_pixels=78400) == (196, 392)
    # a side that floors to 0 stays one factor: 10 / 1.383 / 28 = 0.26 -> 28; 1500 / 1.383 / 28 = 38.7 -> 1064
    assert F.smart_resize(10, 1500, max_pixels=7840) == (28, 1064)
    # the rounded area exactly at max_pixels (84 * 28 = 2352) is kept, exactly at min_pixels too
    assert F.smart_resize(80, 30, min_pixels=784, max_pixels=2352) == (84, 28)
    assert F.smart_resize(80, 30, min_pixels=2352) == (84, 28)
    # below min_pixels: beta = sqrt(3136 / 600) = 2.29; ceil(1.63) = 2 -> 56, ceil(2.45) = 3 -> 84
    assert F.smart_resize(20, 30) == (56, 84)
    assert F.smart_resize(5, 400) == (28, 392)  # the short side rounds to 0: one factor
    assert F.smart_resize(100, 50, factor=10, min_pixels=100, max_pixels=10**6) == (100, 50)
    assert F.smart_resize(1, 200) == (28, 196)  # aspect exactly 200: allowed
    with pytest.raises(ValueError, match=r"^aspect ratio too extreme for Qwen's resize$"):
        F.smart_resize(1, 201)
    with pytest.raises(ValueError):
        F.smart_resize(0, 201)  # the short side counted as 1


# -- prompts -------------------------------------------------------------------------------------------------


def test_default_detect_labels():
    for m in ("XR", "CR", "DX", "DR", "RG", "PX", "MG", "cr"):
        assert F.default_detect_label("minigptmed", m) == "pneumonia", m
    assert F.default_detect_label("minigptmed", "CT") == "tumor"
    assert F.default_detect_label("minigptmed", None) == "tumor"
    assert F.default_detect_label("medgemma", "mr") == "lesion"
    assert F.default_detect_label("qwen3_vl", "MRI") == "lesion"
    assert F.default_detect_label("qwen3_vl", "CT") == "abnormality"
    assert F.default_detect_label("medmo", None) == "abnormality"


def test_report_and_vqa_prompts():
    g = PORTRAIT
    for fam in ("medgemma", "qwen2_5_vl", "qwen3_vl", "generic"):
        assert (
            F.prompt_for(fam, "report", None, None, g, "CT")
            == "Describe this CT image in detail and list the findings."
        )
        assert F.prompt_for(fam, "report", "ignored", None, g) == (
            "Describe this medical image in detail and list the findings."
        )
        assert F.prompt_for(fam, "vqa", "  Is there a nodule?\n", None, g) == "Is there a nodule?"
    with pytest.raises(ValueError) as e:
        F.prompt_for("generic", "ground", "the heart", None, g)
    assert str(e.value) == "the generic family has no box format, so 'ground' is not available"


def test_detect_and_ground_prompts():
    g = PORTRAIT
    assert (
        F.prompt_for("qwen3_vl", "detect", " nodules ", None, g, "CT")
        == f"Locate every nodules in the image. {QWEN_CONTRACT}"
    )
    assert (
        F.prompt_for("qwen2_5_vl", "detect", None, None, g, "MR")
        == f"Locate every lesion in the image. {QWEN_CONTRACT}"
    )
    assert F.prompt_for("qwen3_vl", "detect", "", None, g) == f"Locate every abnormality in the image. {QWEN_CONTRACT}"
    assert (
        F.prompt_for("qwen3_vl", "ground", "left lung", None, g)
        == f"Locate the left lung in the image. {QWEN_CONTRACT}"
    )
    for q in ("The heart", "a nodule", "an opacity", "the aorta"):
        assert F.prompt_for("qwen3_vl", "ground", q, None, g) == f"Locate {q} in the image. {QWEN_CONTRACT}"
    assert F.prompt_for("qwen3_vl", "ground", "thenar eminence", None, g) == (
        f"Locate the thenar eminence in the image. {QWEN_CONTRACT}"  # "the" only as a word
    )
    assert F.prompt_for("medgemma", "detect", None, None, g, "CT") == (
        f"{MEDGEMMA_CONTRACT}\nQuery: Where is every abnormality? {MEDGEMMA_QUERY_TAIL}"
    )
    assert F.prompt_for("medgemma", "ground", "right lung", None, g) == (
        f"{MEDGEMMA_CONTRACT}\nQuery: Where is the right lung? {MEDGEMMA_QUERY_TAIL}"
    )


def test_identify_prompts_name_the_region_in_each_familys_coordinates():
    g = PORTRAIT  # 215 x 390, region (30, 40, 130, 250)

    def ask(key: str, coords: str, contract: str) -> str:
        return (
            f"What is in the region {key} {coords}? Describe it in one sentence, then output it as a JSON list with "
            f'one object with "{key}" {coords} and a short "label". {contract}'
        )

    # MedGemma: pad 87 left on the 390 square, y first: 40/390 = 102.6, (30+87)/390 = 300, 250/390 = 641.0,
    # (130+87)/390 = 556.4
    assert F.prompt_for("medgemma", "identify", None, REGION, g) == ask(
        "box_2d", "[103, 300, 641, 556]", MEDGEMMA_CONTRACT
    )
    # Qwen2.5-VL: pixels of the 224 x 392 resize: 30 * 224/215 = 31.3, 40 * 392/390 = 40.2, 135.4, 251.3
    assert F.prompt_for("qwen2_5_vl", "identify", None, REGION, g) == ask(
        "bbox_2d", "[31, 40, 135, 251]", QWEN_CONTRACT
    )
    # Qwen3-VL: 0..1000 of the image: 30/215 = 139.5, 40/390 = 102.6, 604.7, 641.0
    assert F.prompt_for("qwen3_vl", "identify", None, REGION, g) == ask(
        "bbox_2d", "[140, 103, 605, 641]", QWEN_CONTRACT
    )


def test_medmo_prompts_are_the_readme_ones():
    g = PORTRAIT
    assert (
        F.prompt_for("medmo", "report", None, None, g, "MR") == "Generate a detailed radiology report for this MR scan."
    )
    assert (
        F.prompt_for("medmo", "detect", "rib fractures", None, g) == "Detect and localize rib fractures in this image."
    )
    assert F.medmo_prompt("report", None, None, g) == "Generate a detailed radiology report for this image."
    assert F.medmo_prompt("vqa", " What is this?  ", None, g) == "What is this?"
    assert F.medmo_prompt("detect", None, None, g) == "Detect and localize all abnormalities in this image."
    assert F.medmo_prompt("detect", " rib fractures ", None, g) == "Detect and localize rib fractures in this image."
    assert F.medmo_prompt("ground", "the left kidney", None, g) == "Detect and localize the left kidney in this image."
    assert F.prompt_for("medmo", "identify", None, REGION, g) == (
        "What is shown in the region <box>[[140, 103, 605, 641]]</box>? Answer with its label and box."
    )


# -- boxes both ways -------------------------------------------------------------------------------------------


def test_encode_and_decode_box_per_family():
    g = PORTRAIT
    assert np.allclose(F.encode_box("medgemma", REGION, g), [40 / 390 * 1000, 300, 250 / 390 * 1000, 217 / 390 * 1000])
    assert np.allclose(
        F.encode_box("qwen2_5_vl", REGION, g), [30 * 224 / 215, 40 * 392 / 390, 130 * 224 / 215, 250 * 392 / 390]
    )
    assert np.allclose(
        F.encode_box("medmo", REGION, g), [30 / 215 * 1000, 40 / 390 * 1000, 130 / 215 * 1000, 250 / 390 * 1000]
    )
    # MedGemma portrait: [y0, x0, y1, x1] of the 390 square, minus the 87 px left pad: x = 500/1000*390 - 87 = 108
    assert np.allclose(F.decode_box("medgemma", [100, 500, 600, 700], g), [108, 39, 186, 234])
    # landscape 390 x 215: the pad is on top (87 px): y = 500/1000*390 - 87 = 108
    land = ImageGeometry(width=390, height=215)
    assert np.allclose(F.decode_box("medgemma", [500, 100, 700, 600], land), [39, 108, 234, 186])
    assert np.allclose(F.decode_box("qwen2_5_vl", [112, 196, 224, 392], g), [107.5, 195, 215, 390])
    assert np.allclose(F.decode_box("qwen3_vl", [100, 500, 600, 1000], g), [21.5, 195, 129, 390])
    assert np.allclose(F.decode_box("medmo", [100, 500, 600, 1000], g), [21.5, 195, 129, 390])
    with pytest.raises(ValueError, match=r"^a box has four coordinates$"):
        F.decode_box("qwen3_vl", [1, 2, 3], g)


# -- thinking, JSON, decoding -----------------------------------------------------------------------------------


def test_strip_thinking():
    assert F.strip_thinking("<think>a\nb</think>\n The answer. ") == "The answer."
    assert F.strip_thinking("<think>x</think>A <think>y</think>B") == "A B"
    assert F.strip_thinking("<unused94>thought\nleft<unused95>Answer") == "Answer"
    assert F.strip_thinking("Before <unused94>thought\ncut off by max tokens") == "Before"
    assert F.strip_thinking("reasoning\nmore</think>final") == "final"  # the template opened the block
    # only the block the template opened is cut: a later stray closing tag stays in the text
    assert F.strip_thinking("a</think>b</think>c") == "b</think>c"
    assert F.strip_thinking("no thinking at all") == "no thinking at all"


def test_qwen_decoding_portrait_and_landscape():
    raw = '<think>look\nhere</think>Two things.\n```json\n[{"bbox_2d": [100, 500, 600, 1000], "label": "a"}, {"bbox_2d": [0, 0, 500, 250]}]\n```'
    d = decode_output("qwen3_vl", raw, PORTRAIT, default_label="nodule")
    assert d.text == "Two things." and d.warnings == []
    assert _at(d, [[21.5, 195, 129, 390], [0, 0, 107.5, 97.5]])
    assert [f.label for f in d.findings] == ["a", "nodule"] and [f.score for f in d.findings] == [None, None]
    land = ImageGeometry(width=390, height=215, model_width=392, model_height=224)
    d = decode_output("qwen2_5_vl", '```\n[{"bbox_2d": [196, 112, 392, 224], "label": "b", "score": 0.75}]\n```', land)
    assert _at(d, [[195, 107.5, 390, 215]]) and d.findings[0].score == 0.75
    assert d.text == "b"  # nothing but the fence: the labels
    d = decode_output(
        "qwen3_vl", '```json\n[{"bbox_2d": [0, 0, 1, 1], "label": "b"}, {"bbox_2d": [0, 0, 2, 2]}]\n```', land
    )
    assert d.text == "b, finding"


def test_medgemma_decoding_final_answer_on_both_axes():
    raw = (
        "<unused94>thought\nthe heart<unused95>The lung is marked.\nFinal Answer: ```json\n"
        '[{"box_2d": [100, 500, 600, 700], "label": "right lung"}]\n```'
    )
    d = decode_output("medgemma", raw, PORTRAIT)
    assert d.text == "The lung is marked." and d.warnings == []
    assert _at(d, [[108, 39, 186, 234]]) and d.findings[0].label == "right lung"
    land = ImageGeometry(width=390, height=215)
    d = decode_output("medgemma", 'Final Answer: [{"box_2d": [500, 100, 700, 600], "label": 7}]', land)
    assert _at(d, [[39, 108, 234, 186]]) and d.findings[0].label == "7" and d.text == "7"
    # "Final Answer:" twice: the JSON after the first one
    d = decode_output("medgemma", 'Final Answer: (see below) Final Answer: [{"box_2d": [0, 0, 1000, 1000]}]', land)
    assert _at(d, [[0, -87, 390, 303]]) and d.findings[0].label == "finding"
    assert d.text == "finding"  # nothing before the first "Final Answer:"
    # a JSON list after each: the one after the first
    two = 'Final Answer: [{"box_2d": [0, 0, 500, 500]}] Final Answer: [{"box_2d": [0, 0, 1000, 1000]}]'
    assert _at(decode_output("medgemma", two, land), [[0, -87, 195, 108]])
    # JSON in the reasoning before the answer (an example list, a fenced block) is not the answer
    reasoning = (
        'The format is [y0, x0, y1, x1], e.g. ```json [{"box_2d": [1, 2, 3, 4]}] ``` here. Final Answer: '
        '```json [{"box_2d": [0, 0, 500, 500], "label": "lung"}] ```'
    )
    d = decode_output("medgemma", reasoning, land)
    assert _at(d, [[0, -87, 195, 108]]) and d.warnings == []
    assert d.text == 'The format is [y0, x0, y1, x1], e.g. ```json [{"box_2d": [1, 2, 3, 4]}] ``` here.'
    d = decode_output("medgemma", 'See [1]. Final Answer: [{"box_2d": [0, 0, 500, 500]}]', land)
    assert _at(d, [[0, -87, 195, 108]]) and d.warnings == [] and d.text == "See [1]."
    # the other family's key is no box
    d = decode_output("medgemma", '```json\n[{"bbox_2d": [0, 0, 10, 10], "label": "x"}]\n```', land)
    assert d.findings == [] and d.warnings == [
        "1 object(s) in the model's answer had no usable box_2d and were dropped"
    ]


def test_json_without_a_fence_and_with_junk():
    g = ImageGeometry(width=200, height=100)
    # an object before a list: the outermost value starts at the brace
    d = decode_output("qwen3_vl", 'Here {"bbox_2d": [100, 200, 300, 400], "label": "x"} done, see [1]', g)
    assert _at(d, [[20, 20, 60, 40]]) and d.findings[0].label == "x" and d.warnings == []
    # two objects without a list: the first one (the search starts at the first brace, not the last)
    two = 'A {"bbox_2d": [0, 0, 500, 500], "label": "a"} and {"bbox_2d": [500, 500, 1000, 1000], "label": "b"}'
    d = decode_output("qwen3_vl", two, g)
    assert [f.label for f in d.findings] == ["a"] and _at(d, [[0, 0, 100, 50]])
    # trailing junk of any length (every end position is tried, not every other one)
    for junk in ("", " .", " ..", " ...", " ]"):
        d = decode_output("qwen3_vl", '[{"bbox_2d": [0, 0, 500, 500], "label": "y"}]' + junk, g)
        assert _at(d, [[0, 0, 100, 50]]) and d.warnings == [], junk
        d = decode_output("qwen3_vl", '{"bbox_2d": [0, 0, 500, 500], "label": "y"}' + junk, g)  # one object
        assert _at(d, [[0, 0, 100, 50]]) and d.warnings == [], junk
    # a list at the very start of the answer, trailing junk with a bracket inside the fence
    d = decode_output("qwen3_vl", '[{"bbox_2d": [0, 0, 500, 500], "label": "y"}] and [2', g)
    assert _at(d, [[0, 0, 100, 50]])
    d = decode_output("qwen3_vl", '```json\n[{"bbox_2d": [0, 0, 500, 500], "label": "y"}] see [1]\n```', g)
    assert _at(d, [[0, 0, 100, 50]]) and d.text == "y"
    # no JSON at all: the text, no warning
    d = decode_output("qwen3_vl", "No abnormality is seen.", g)
    assert (d.text, d.findings, d.warnings) == ("No abnormality is seen.", [], [])
    d = decode_output("qwen3_vl", "{not json", g)
    assert d.findings == [] and d.warnings == ["the model's JSON could not be parsed; its boxes were dropped"]
    assert d.text == "{not json"


def test_a_cut_off_list_keeps_its_complete_objects():
    g = ImageGeometry(width=200, height=100)
    raw = (
        '```json\n[{"bbox_2d": [0, 0, 500, 500], "label": "a"}, {"bbox_2d": [500, 500, 1000, 1000], "label": "b"}, '
        '{"bbox_2d": [1'
    )
    d = decode_output("qwen3_vl", raw, g)
    assert [f.label for f in d.findings] == ["a", "b"] and d.warnings == []
    assert _at(d, [[0, 0, 100, 50], [100, 50, 200, 100]])
    for cut in ('{"bbox_2d": [1', '{"bbox_2d": [12', '{"bbox_2d"', "{"):  # cut anywhere: the complete ones kept
        d = decode_output("qwen3_vl", '[{"bbox_2d": [0, 0, 500, 500], "label": "a"}, ' + cut, g)
        assert [f.label for f in d.findings] == ["a"] and d.warnings == [], cut
    # the last closing brace belongs to a nested object of the cut one: the list up to the previous one
    raw = '[{"bbox_2d": [0, 0, 500, 500], "label": "a"}, {"label": "b", "x": {"y": 1}'
    d = decode_output("qwen3_vl", raw, g)
    assert [f.label for f in d.findings] == ["a"] and d.warnings == []
    # a single object, not a list
    d = decode_output("qwen3_vl", '```json {"bbox_2d": [500, 0, 1000, 500], "label": "c"} ```', g)
    assert _at(d, [[100, 0, 200, 50]])


def test_the_first_parsable_json_block_wins():
    g = ImageGeometry(width=200, height=100)
    two = '```json\n[{"bbox_2d": [0, 0, 500, 500], "label": "first"}]\n``` and ```json\n[{"bbox_2d": [0, 0, 1000, 1000], "label": "second"}]\n```'
    d = decode_output("qwen3_vl", two, g)
    assert [f.label for f in d.findings] == ["first"] and d.text == "and"
    broken_then_good = '```json\n[{"bbox_2d": \n``` ```json\n[{"bbox_2d": [0, 0, 1000, 1000], "label": "good"}]\n```'
    d = decode_output("qwen3_vl", broken_then_good, g)
    assert [f.label for f in d.findings] == ["good"]
    assert d.warnings == ["the model's JSON could not be parsed; its boxes were dropped"]


def test_only_json_numbers_are_coordinates():
    g = ImageGeometry(width=200, height=100)
    objs = (
        '[5, "text", {"label": "no box"}, {"bbox_2d": [1, 2, 3]}, {"bbox_2d": [1, 2, 3, 4, 5]}, '
        '{"bbox_2d": ["100", 0, 200, 200]}, {"bbox_2d": [true, 0, 200, 200]}, {"bbox_2d": [NaN, 0, 200, 200]}, '
        '{"bbox_2d": [1e999, 0, 200, 200]}, {"bbox_2d": "0 0 10 10"}, '
        '{"bbox_2d": [0, 0, 1000, 1000], "label": "", "score": "0.9"}, {"bbox_2d": [0, 0, 500, 1000], "score": true}]'
    )
    d = decode_output("qwen3_vl", "```json\n" + objs + "\n```", g, default_label="lesion")
    assert _at(d, [[0, 0, 200, 100], [0, 0, 100, 100]])
    assert [(f.label, f.score) for f in d.findings] == [("lesion", None), ("lesion", None)]
    assert d.warnings == ["10 object(s) in the model's answer had no usable bbox_2d and were dropped"]
    # Qwen2.5-VL without the resized size (0 x 0): a division by zero drops the box
    d = decode_output("qwen2_5_vl", '[{"bbox_2d": [0, 0, 10, 10]}]', ImageGeometry(width=200, height=100))
    assert d.findings == [] and d.warnings == [
        "1 object(s) in the model's answer had no usable bbox_2d and were dropped"
    ]


def test_empty_json_keeps_the_whole_text_and_generic_has_no_boxes():
    g = ImageGeometry(width=200, height=100)
    assert decode_output("qwen3_vl", "```json\n[]\n```", g).text == "```json\n[]\n```"
    assert decode_output("medgemma", "Final Answer: []", g).text == "Final Answer: []"
    d = decode_output("generic", '<think>x</think>[{"bbox_2d": [0, 0, 10, 10]}]', g)
    assert (d.text, d.findings, d.warnings) == ('[{"bbox_2d": [0, 0, 10, 10]}]', [], [])
    assert decode_output("generic", 12, g).text == "12"  # not a string: its text


def test_medmo_decoding():
    g = PORTRAIT  # 215 x 390
    d = decode_output(
        "medmo", "<think>hm</think>Fractures <box>[[100, 500, 600, 1000], [0, 0, 200, 100]]</box>", g, "x"
    )
    assert d.text == "Fractures" and d.warnings == []  # the label once, not once per box
    assert [f.label for f in d.findings] == ["Fractures", "Fractures"]
    assert _at(d, [[21.5, 195, 129, 390], [0, 0, 43, 39]])
    d = decode_output("medmo", "<box>[[0, 0, 1000, 500]]</box>", g, "lesion")
    assert [f.label for f in d.findings] == ["lesion"] and _at(d, [[0, 0, 215, 195]])
    assert d.text == "lesion"
    huge = "9" * 400  # float("99...9") is inf: not a box
    d = decode_output("medmo", f"Mass <box>[[{huge}, 0, 10, 10], [0, 0, 1000, 1000]]</box>", g, "x")
    assert _at(d, [[0, 0, 215, 390]])
    assert d.warnings == ["1 box(es) in the model's answer were not finite and were dropped"]
    d = decode_output("medmo", f"Mass <box>[[{huge}, 0, 10, 10], [0, {huge}, 10, 10], [0, 0, 1, 1]]</box>", g, "x")
    assert d.warnings == ["2 box(es) in the model's answer were not finite and were dropped"] and len(d.findings) == 1
    d = decode_output("medmo", "Fractures <box>[[0, 0, 10, 10]]</box> Effusion <box>[[0, 0, 20, 20]]</box>", g, "x")
    assert [f.label for f in d.findings] == ["Fractures", "Effusion"] and d.text == "Fractures Effusion"
    d = decode_output("medmo", "No fracture.", g, "x")
    assert (d.text, d.findings, d.warnings) == ("No fracture.", [], [])
