"""The built-in engine on HU: lesion phantoms built from the real chest CT, the unmodified CT, the MNI brain and
images without HU (the honest 501), ground's vocabulary, identify against numpy."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_image, chest_phantom
from ct_phantoms import SPACING, Insert, axial_stack, insert, lung_clearance, pleural_point
from MiniGPTMedSlicerLib.merge3d import SliceDetection, merge_detections

from backend.engines.base import AnalysisInput, DecodedImage, ScalarValues, StopToken, TaskNotSupported
from backend.engines.builtin import BuiltinEngine

SP2 = (SPACING[1], SPACING[2])
K0, K1 = 58, 98  # the slab of the phantom sweep (40 axial slices, 100 mm)


def _run(task: str, hu: np.ndarray | None, image: np.ndarray | None = None, spacing=SP2, **kw):
    eng = BuiltinEngine()
    if image is None:
        image = np.clip((hu + 160) / 400 * 255, 0, 255).astype(np.uint8)
    values = ScalarValues(hu.astype(np.float32), "HU") if hu is not None else None
    inp = AnalysisInput(task=task, image=DecodedImage(image, "PNG"), pixel_spacing_mm=spacing, values=values, **kw)
    (res,) = eng.analyze_batch([inp], StopToken())
    return res


def _center(box):
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


@pytest.fixture(scope="module")
def ct(chest_ct_path) -> np.ndarray:
    return axial_stack(chest_ct_path)


@pytest.fixture(scope="module")
def phantom(ct):
    """The real CT with nodules inserted at places chosen from the HU alone (ct_phantoms), and its sweep."""
    stack = ct.copy()
    clear = lung_clearance(stack, K0, K1)
    used: list[np.ndarray] = []

    def place(radius_mm: float) -> tuple[float, float, float]:
        pts = np.argwhere(clear >= radius_mm + 2.0)
        pts = pts[(pts[:, 0] >= 6) & (pts[:, 0] < K1 - K0 - 6)]
        rng = np.random.default_rng(len(used))
        for i in rng.permutation(len(pts)):
            p = pts[i] + np.array([K0, 0, 0])
            if all(np.linalg.norm((p - q) * np.array(SPACING)) > radius_mm + 30 for q in used):
                used.append(p)
                return (float(p[0]), float(p[1]), float(p[2]))
        raise AssertionError(f"no room for a {2 * radius_mm} mm nodule")

    inserts = [Insert("solid", place(d / 2), (d / 2,) * 3, 40.0) for d in (6.0, 8.0, 12.0, 20.0)]
    inserts.append(Insert("ellipsoid", place(6.0), (4.0, 6.0, 4.5), 30.0))
    inserts.append(Insert("ground-glass", place(6.0), (6.0,) * 3, -600.0))
    inserts.append(Insert("small", place(2.0), (2.0,) * 3, 40.0))
    inserts.append(Insert("juxtapleural", pleural_point(stack, 78, 5.0, "image-right"), (5.0,) * 3, 40.0))
    for i, ins in enumerate(inserts):
        insert(stack, ins, seed=i)
    eng = BuiltinEngine()
    inputs = [
        AnalysisInput(
            "detect",
            DecodedImage(np.zeros(stack.shape[1:], np.uint8), "PNG"),
            pixel_spacing_mm=SP2,
            modality="CT",
            values=ScalarValues(stack[k], "HU"),
        )
        for k in range(K0, K1)
    ]
    results = eng.analyze_batch(inputs, StopToken())
    dets = [SliceDetection(i, f.label, tuple(f.box), f.score) for i, r in enumerate(results) for f in r.findings]
    p2r = []
    for k in range(K0, K1):
        m = np.eye(4)
        m[0, 0], m[1, 1], m[2, 3] = SPACING[2], SPACING[1], k * SPACING[0]
        p2r.append(m)
    found3d = merge_detections(dets, p2r, SPACING[0])
    return inserts, results, found3d


def _hit(ins: Insert, k: int, box) -> bool:
    b = ins.box_on(k)
    if b is None:
        return False
    cx, cy = _center(box)
    return b[0] - 2 <= cx <= b[2] + 2 and b[1] - 2 <= cy <= b[3] + 2


def test_phantom_sweep_sensitivity_and_false_positives(phantom):
    inserts, _results, found3d = phantom
    nodules = [f for f in found3d if f.label.startswith("lung nodule candidate")]
    found = {}
    false = []
    for f in nodules:
        k = K0 + f.best_slice_pos
        box = f.boxes[f.slice_positions.index(f.best_slice_pos)]
        hits = [i for i, ins in enumerate(inserts) if _hit(ins, k, box)]
        if hits:
            found[hits[0]] = f
        else:
            false.append(f)
    kinds = {inserts[i].kind for i in found}
    # every solid nodule >= 6 mm (and the ellipsoid)
    assert {"solid", "ellipsoid"} <= kinds
    assert sum(1 for i in found if inserts[i].kind == "solid") == 4
    # at least two of {4 mm, ground-glass 12 mm, juxtapleural 10 mm}
    assert len(kinds & {"small", "ground-glass", "juxtapleural"}) >= 2, kinds
    # 3D sizes: the diameter of each found solid nodule within 35 % of the truth
    for i, f in found.items():
        if inserts[i].kind == "solid":
            assert abs(f.diameter_mm - inserts[i].diameter_mm) <= 0.35 * inserts[i].diameter_mm + 1.5, f
            assert f.volume_ml is not None and f.volume_ml > 0
    # false positives in this 40-slice slab (the full-volume figure is in docs/benchmarks.md)
    assert len(false) <= 5, [(f.label, K0 + f.best_slice_pos) for f in false]


def test_phantom_labels_say_what_was_measured(phantom):
    inserts, results, _ = phantom
    ggo = next(i for i in inserts if i.kind == "ground-glass")
    k = int(round(ggo.center[0]))
    labels = [f.label for f in results[k - K0].findings if _hit(ggo, k, f.box)]
    assert labels and "ground-glass" in labels[0], labels
    solid = next(i for i in inserts if i.kind == "solid" and i.diameter_mm == 12.0)
    k = int(round(solid.center[0]))
    (f,) = [f for f in results[k - K0].findings if _hit(solid, k, f.box)]
    assert f.label.startswith("lung nodule candidate (solid, ")
    mm = int(f.label.split(", ")[1].split(" ")[0])
    hu = int(f.label.split(", ")[2].split(" ")[0])
    assert 9 <= mm <= 14 and 0 <= hu <= 70
    # the box is where the nodule was put, computed from its centre and radius
    x0, y0, x1, y1 = solid.box_on(k)
    assert abs(_center(f.box)[0] - (x0 + x1) / 2) <= 1.5 and abs(_center(f.box)[1] - (y0 + y1) / 2) <= 1.5


def test_unmodified_ct_nothing_on_bone_or_fat(ct):
    """Every 8th slice of the real CT: no candidate whose own pixels are bone or fat in the original HU."""
    n = 0
    for k in range(4, ct.shape[0], 8):
        res = _run("detect", ct[k])
        for f in res.findings:
            n += 1
            x0, y0, x1, y1 = (int(round(v)) for v in f.box)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            core = ct[k, max(y0, cy - 2) : cy + 3, max(x0, cx - 2) : cx + 3]
            med = float(np.median(core))
            assert med < 300, (k, f.label, med)  # not bone / calcium
            assert not (-190 <= med < -30), (k, f.label, med)  # not fat
    assert n <= 2 * len(range(4, ct.shape[0], 8))


@pytest.mark.parametrize("phrase", ["liver", "rib fracture", "pleural effusion", "aortic dissection", ""])
def test_ground_unsupported_phrase_gets_no_box_and_names_the_vocabulary(ct, phrase):
    res = _run("ground", ct[75], question=phrase or None, prompt=None if phrase else "?")
    assert res.findings == []
    assert "cannot locate" in res.text and "lung nodule" in res.text and "right lung" in res.text
    assert res.warnings and res.warnings[0].startswith("unsupported phrase")


def test_ground_supported_phrases(ct):
    hu = ct[75]
    right = _run("ground", hu, question="right lung").findings
    left = _run("ground", hu, question="the left lung field").findings
    assert len(right) == 1 and len(left) == 1
    assert right[0].label.startswith("right lung field") and left[0].label.startswith("left lung field")
    # radiological convention: patient's right on the image's left
    assert _center(right[0].box)[0] < hu.shape[1] / 2 < _center(left[0].box)[0]
    # the boxes enclose the aerated lung: inside them, most pixels are below -400 HU
    for f in (right[0], left[0]):
        x0, y0, x1, y1 = (int(v) for v in f.box)
        assert (hu[y0:y1, x0:x1] < -400).mean() > 0.5
    spine = _run("ground", hu, question="vertebra").findings
    assert len(spine) == 1 and spine[0].label.startswith("midline bone")
    x0, y0, x1, y1 = (int(v) for v in spine[0].box)
    assert np.median(hu[y0:y1, x0:x1]) > 150 or (hu[y0:y1, x0:x1] >= 300).mean() > 0.2
    nod = _run("ground", hu, question="pulmonary nodule")
    assert all(f.label.startswith("lung nodule candidate") for f in nod.findings)
    if not nod.findings:
        assert "No lung nodule found" in nod.text


def test_identify_numbers_match_numpy_on_the_same_pixels(ct):
    hu = ct[75]
    region = (100.3, 180.6, 161.2, 240.0)  # pixels whose centres lie inside: cols 100..160, rows 181..239
    res = _run("identify", hu, region=region)
    inside = hu[181:240, 100:161].astype(np.float64)
    t = res.text
    assert f"mean {inside.mean():.0f} HU" in t and f"SD {inside.std():.0f}," in t
    assert f"min {inside.min():.0f}," in t and f"max {inside.max():.0f}." in t
    assert f", {inside.size} pixels)" in t
    area = inside.size * SP2[0] * SP2[1]
    assert f"{area:.0f} mm²" in t
    fat = 100 * float(((inside >= -190) & (inside < -30)).mean())
    assert f"fat {fat:.0f}%" in t or fat < 0.5
    assert res.findings[0].box == list(region)


def test_focal_lesion_in_the_liver_found_and_placed(ct):
    k = 40
    stack = ct[k - 3 : k + 4].copy()
    ins = Insert("hypodense", (3.0, 200.0, 170.0), (7.5, 7.5, 7.5), 30.0)
    insert(stack, ins)
    res = _run("detect", stack[3])
    hits = [f for f in res.findings if f.label.startswith("focal hypodense lesion candidate") and _hit(ins, 3, f.box)]
    assert hits, [f.label for f in res.findings]
    assert " vs " in hits[0].label and "HU" in hits[0].label


def test_chest_phantom_nodules_on_a_non_square_image():
    hu = chest_phantom(height=200, width=300, nodules=((90, 80, 7),), spacing=0.8)
    res = _run("detect", hu, spacing=(0.8, 0.8))
    (f,) = res.findings
    assert abs(_center(f.box)[0] - 80.5) <= 1 and abs(_center(f.box)[1] - 90.5) <= 1


def test_mni_brain_and_images_without_hu(mni_path):
    vol = np.asarray(nib.load(str(mni_path)).dataobj)
    sl = vol[:, :, 90].T[::-1].astype(np.uint8)
    for task in ("detect", "ground"):
        with pytest.raises(TaskNotSupported, match="--engine minigptmed"):
            _run(task, None, image=sl, spacing=(1.0, 1.0), modality="MR", question="ventricle")
    rep = _run("report", None, image=sl, spacing=(1.0, 1.0), modality="MR")
    assert rep.findings == [] and "measures intensities only" in rep.text and "not a diagnosis" in rep.text
    ident = _run("identify", None, image=sl, spacing=(1.0, 1.0), modality="MR", region=(60.0, 80.0, 100.0, 120.0))
    inside = sl[80:120, 60:100].astype(np.float64)
    assert f"mean {inside.mean():.0f} gray" in ident.text
    xr = blob_image()
    with pytest.raises(TaskNotSupported, match="XR"):
        _run("detect", None, image=xr, modality="XR")


def test_model_id_and_texts_say_not_a_diagnosis(ct):
    eng = BuiltinEngine()
    assert "rule-based candidates, not a diagnosis" in eng.info().model
    for task, kw in (
        ("detect", {}),
        ("report", {}),
        ("ground", {"question": "fat"}),
        ("identify", {"region": (1.0, 1.0, 9.0, 9.0)}),
    ):
        assert "not a diagnosis" in _run(task, ct[75], **kw).text
    assert math.isfinite(_run("detect", ct[75]).timings_ms["analysis"])


def test_follow_ups_on_the_wire_identify_answers_and_the_rest_is_501(builtin_server, ct):
    """A conversation with the built-in engine over the real server: a follow-up identify (the region's HU
    measurement) with the earlier turns answers as it does alone; a free-text follow-up is the honest 501, and so is
    a ground follow-up on an image without HU."""
    import requests
    from conftest import b64
    from MiniGPTMedSlicerLib.png import encode_png

    url = builtin_server
    stored_hu = np.clip(ct[75] + 1024, 0, 65535).astype(np.uint16)  # what the wire carries; the test's HU below
    hu = stored_hu.astype(np.float64) - 1024
    image = np.clip((hu + 160) / 400 * 255, 0, 255).astype(np.uint8)
    values = {"data": b64(encode_png(stored_hu)), "slope": 1.0, "intercept": -1024.0, "unit": "HU"}
    up = requests.post(f"{url}/v1/images", json={"image": b64(encode_png(image)), "values": values}, timeout=30)
    assert up.status_code == 200, up.text
    base = {"image_id": up.json()["image_id"], "pixel_spacing_mm": list(SP2), "modality": "CT"}

    def post(body, status=200):
        r = requests.post(f"{url}/v1/analyze", json={**base, **body}, timeout=60)
        assert r.status_code == status, r.text
        return r.json()

    first = post({"task": "report"})
    history = [{"question": "", "answer": first["raw_output"], "task": "report"}]
    ident = {"task": "identify", "region": [100.3, 180.6, 161.2, 240.0]}
    alone, follow = post(ident), post({**ident, "history": history})
    assert follow["text"] == alone["text"] and follow["findings"] == alone["findings"]
    assert f"mean {hu[181:240, 100:161].mean():.0f} HU" in follow["text"]
    e = post({"task": "vqa", "question": "Is it malignant?", "history": history}, 501)["error"]
    assert e["code"] == "not_supported" and "vision-language model" in e["message"]
    plain = requests.post(f"{url}/v1/images", json={"image": b64(encode_png(image))}, timeout=30).json()
    e = post({"task": "ground", "question": "nodule", "image_id": plain["image_id"], "history": history}, 501)
    assert e["error"]["code"] == "not_supported"


def test_one_slice_on_two_cores_gives_what_one_core_gives(ct):
    """A single slice on a machine with cores to spare runs its nodule and lesion passes side by side
    (``split``): the findings are those of the passes run one after the other, here with both kinds present."""
    from backend.settings import BuiltinSettings

    k = 40
    stack = ct[k - 3 : k + 4].copy()
    insert(stack, Insert("hypodense", (3.0, 200.0, 170.0), (7.5, 7.5, 7.5), 30.0))
    slices = [stack[3], ct[75], ct[90]]
    got: dict[int, list] = {}
    for workers in (1, 2):
        eng = BuiltinEngine(BuiltinSettings(workers=workers))
        eng.load()
        got[workers] = []
        for hu in slices:
            inp = AnalysisInput(
                "detect",
                DecodedImage(np.zeros(hu.shape, np.uint8), "PNG"),
                pixel_spacing_mm=SP2,
                modality="CT",
                values=ScalarValues(hu.astype(np.float32), "HU"),
            )
            (res,) = eng.analyze_batch([inp], StopToken())
            got[workers].append([(f.label, f.box, f.score) for f in res.findings])
    assert got[1] == got[2]
    labels = [lab for found in got[2] for lab, _, _ in found]
    assert any(lab.startswith("focal hypodense") for lab in labels)
    assert any(lab.startswith("lung nodule candidate") for lab in labels)
