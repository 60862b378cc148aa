"""The HTTP API against a real uvicorn server with the built-in engine: happy paths and every bad input
the foundation issue lists. After each bad request the server must still answer /health."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
import requests
from conftest import b64, blob_image, chest_phantom, ct_request
from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib.png import encode_png
from PIL import Image


def _post(url: str, body, **kw) -> requests.Response:
    return requests.post(f"{url}/v1/analyze", json=body, timeout=60, **kw)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(w: int, h: int, idat: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _huge_png(w: int, h: int) -> bytes:
    """A real, complete 8-bit gray PNG of w x h black pixels (a few hundred kB: a decompression bomb)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (w + 1)
    parts = [comp.compress(row * 1000) for _ in range(h // 1000)]
    parts.append(comp.compress(row * (h % 1000)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def blob_png() -> bytes:
    return encode_png(blob_image())


def _assert_error(resp: requests.Response, status: int, code: str | None = None, words: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    err = protocol.from_dict(protocol.ErrorBody, body).error
    assert err.message and "Traceback" not in err.message
    if code:
        assert err.code == code, body
    if words:
        assert words.lower() in err.message.lower(), err.message
    return body


def _still_healthy(url: str) -> None:
    r = requests.get(f"{url}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_health_reports_engine_and_tasks(builtin_server):
    h = protocol.from_dict(protocol.Health, requests.get(f"{builtin_server}/health", timeout=10).json())
    assert h.status == "ok" and h.engine == "builtin"
    assert "not a diagnosis" in h.model
    assert set(h.tasks) == {"report", "detect", "ground", "identify"}
    assert h.device == "cpu" and h.version


def test_detect_finds_the_nodules_in_pixels_of_the_sent_image(builtin_server):
    hu = chest_phantom()  # 256 x 320, nodules at (cy, cx, r px) = (110, 100, 6) and (150, 225, 8)
    r = _post(builtin_server, ct_request(hu, task="detect"))
    resp = protocol.from_dict(protocol.AnalyzeResponse, r.json())
    assert resp.engine == "builtin" and resp.task == "detect"
    assert len(resp.findings) == 2
    for f, (cy, cx, rad) in zip(
        sorted(resp.findings, key=lambda f: f.box[0]), ((110, 100, 6), (150, 225, 8)), strict=True
    ):
        x0, y0, x1, y1 = f.box
        assert abs((x0 + x1) / 2 - (cx + 0.5)) <= 1 and abs((y0 + y1) / 2 - (cy + 0.5)) <= 1
        assert abs((x1 - x0) - (2 * rad + 1)) <= 2
        assert f.label.startswith("lung nodule candidate (solid, ")
    assert "not a diagnosis" in resp.text and resp.raw_output
    assert resp.timings_ms["engine"] > 0


def test_detect_without_hu_is_501_naming_the_vlm_engines(builtin_server):
    img = blob_image()
    buf = io.BytesIO()
    Image.fromarray(np.repeat(img[:, :, None], 3, axis=2)).save(buf, format="JPEG", quality=95)
    for body in (
        {"task": "detect", "image": b64(buf.getvalue())},
        {"task": "detect", "image": b64(encode_png(blob_image(dtype=np.uint16))), "modality": "MR"},
        {"task": "ground", "image": b64(encode_png(img)), "question": "lung nodule", "modality": "XR"},
    ):
        _assert_error(_post(builtin_server, body), 501, "not_supported", "--engine hf")
    # report and identify still measure intensities
    rep = _post(builtin_server, {"task": "report", "image": b64(buf.getvalue()), "modality": "XR"})
    assert rep.status_code == 200 and "intensities" in rep.json()["text"].lower()
    _still_healthy(builtin_server)


def test_report_ground_identify(builtin_server):
    hu = chest_phantom()
    rep = _post(builtin_server, ct_request(hu, task="report")).json()
    assert "2 candidate(s)" in rep["text"] and "not a diagnosis" in rep["text"]
    assert "Right lung field" in rep["text"] and "Left lung field" in rep["text"]
    g = _post(builtin_server, ct_request(hu, task="ground", question="the pulmonary nodule")).json()
    assert len(g["findings"]) == 2 and all(f["label"].startswith("lung nodule candidate") for f in g["findings"])
    region = [90, 96, 112, 124]
    ident = _post(builtin_server, ct_request(hu, task="identify", region=region)).json()
    assert ident["findings"][0]["box"] == region
    inside = hu[96:124, 90:112]
    assert f"mean {inside.mean():.0f} HU" in ident["text"] and f"max {inside.max():.0f}" in ident["text"]


def test_batch_matches_single_requests(builtin_server):
    items = [ct_request(chest_phantom(seed=s), task="detect") for s in (0, 1)]
    items.append(ct_request(chest_phantom(nodules=((120, 90, 9),), seed=2), task="detect"))
    batch = requests.post(f"{builtin_server}/v1/analyze/batch", json={"items": items}, timeout=60)
    results = protocol.from_dict(protocol.BatchResponse, batch.json()).results
    singles = [_post(builtin_server, it).json() for it in items]
    assert [[f.box for f in r.findings] for r in results] == [[f["box"] for f in s["findings"]] for s in singles]
    assert [len(r.findings) for r in results] == [2, 2, 1]


BAD_INPUTS = [
    ("non-image bytes", lambda png: {"task": "detect", "image": b64(b"hello, this is not an image")}, 400, "bad_image"),
    ("invalid base64", lambda png: {"task": "detect", "image": "***not base64***"}, 400, "bad_image"),
    ("empty file", lambda png: {"task": "detect", "image": ""}, 400, "bad_image"),
    ("0x0 image", lambda png: {"task": "detect", "image": b64(_png_header_only(0, 0))}, 400, "bad_image"),
    ("truncated PNG", lambda png: {"task": "detect", "image": b64(png[: len(png) // 2])}, 400, "bad_image"),
    ("unknown task", lambda png: {"task": "segment", "image": b64(png)}, 422, "invalid_schema"),
    ("vqa without a question", lambda png: {"task": "vqa", "image": b64(png)}, 400, "bad_request"),
    (
        "region outside the image",
        lambda png: {"task": "identify", "image": b64(png), "region": [300, 300, 400, 400]},
        400,
        "bad_request",
    ),
    ("identify without region", lambda png: {"task": "identify", "image": b64(png)}, 400, "bad_request"),
    (
        "inverted region",
        lambda png: {"task": "identify", "image": b64(png), "region": [50, 50, 10, 10]},
        400,
        "bad_request",
    ),
    ("missing image", lambda png: {"task": "detect"}, 400, "bad_request"),
    ("wrong type", lambda png: {"task": "detect", "image": b64(png), "max_new_tokens": "many"}, 422, "invalid_schema"),
    ("too many tokens", lambda png: {"task": "detect", "image": b64(png), "max_new_tokens": 10**6}, 400, "bad_request"),
    ("bad spacing", lambda png: {"task": "detect", "image": b64(png), "pixel_spacing_mm": [0, -1]}, 400, "bad_request"),
]


@pytest.mark.parametrize("name,make,status,code", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_documented_4xx_and_server_keeps_serving(builtin_server, blob_png, name, make, status, code):
    _assert_error(_post(builtin_server, make(blob_png)), status, code)
    _still_healthy(builtin_server)


def test_vqa_on_builtin_is_501_naming_the_vlm_engines(builtin_server, blob_png):
    body = _assert_error(
        _post(builtin_server, {"task": "vqa", "image": b64(blob_png), "question": "Is there a nodule?"}),
        501,
        "not_supported",
    )
    assert "--engine minigptmed" in body["error"]["message"] and "--engine hf" in body["error"]["message"]


def test_20000_square_png_is_rejected_before_decoding(builtin_server):
    data = _huge_png(20000, 20000)
    assert len(data) < 2_000_000  # a real bomb: 400 MB of pixels in a small file
    _assert_error(_post(builtin_server, {"task": "detect", "image": b64(data)}), 413, "too_large", "20000x20000")
    _still_healthy(builtin_server)


def test_50_mb_body_is_413(builtin_server):
    body = b'{"task": "detect", "image": "' + b"A" * (50 * 1024 * 1024) + b'"}'
    try:
        r = requests.post(
            f"{builtin_server}/v1/analyze", data=body, headers={"Content-Type": "application/json"}, timeout=60
        )
        _assert_error(r, 413, "too_large")
    except requests.exceptions.ConnectionError:
        # The server may answer 413 and close before the client finished sending; either way it refused the body.
        pass
    _still_healthy(builtin_server)


def test_not_json_and_unknown_path(builtin_server):
    r = requests.post(
        f"{builtin_server}/v1/analyze", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10
    )
    _assert_error(r, 422, "invalid_schema")
    _assert_error(requests.get(f"{builtin_server}/v2/nothing", timeout=10), 404, "not_found")
    _still_healthy(builtin_server)


def test_data_uri_image_is_accepted(builtin_server, blob_png):
    r = _post(
        builtin_server, {"task": "report", "image": "data:image/png;base64," + base64.b64encode(blob_png).decode()}
    )
    assert r.status_code == 200


def test_openapi_docs_are_served(builtin_server):
    assert requests.get(f"{builtin_server}/docs", timeout=10).status_code == 200
    spec = requests.get(f"{builtin_server}/openapi.json", timeout=10).json()
    assert "/v1/analyze" in spec["paths"] and "/v1/analyze/batch" in spec["paths"]


def _values_case(name: str) -> dict:
    hu = chest_phantom(height=64, width=80, nodules=())
    body = ct_request(hu, task="detect")
    v = body["values"]
    if name == "wrong size":
        v["data"] = ct_request(hu[:, :60])["values"]["data"]
    elif name == "8-bit":
        v["data"] = b64(encode_png(np.zeros(hu.shape, np.uint8)))
    elif name == "NaN slope":
        v["slope"] = float("nan")
    elif name == "zero slope":
        v["slope"] = 0.0
    elif name == "oversize":
        v["data"] = b64(_png_header_only(9000, 10))
    elif name == "bad unit":
        v["unit"] = "kelvin"
    return body


@pytest.mark.parametrize(
    "name,status,code,words",
    [
        ("wrong size", 400, "bad_image", "must be resliced with exactly the image's geometry"),
        ("8-bit", 400, "bad_image", "16-bit grayscale PNG"),
        ("NaN slope", 400, "bad_request", "values.slope must be a finite"),
        ("zero slope", 400, "bad_request", "values.slope must be a finite, nonzero"),
        ("oversize", 413, "too_large", "9000x10"),
        ("bad unit", 422, "invalid_schema", None),
    ],
)
def test_values_validation_is_documented_4xx(builtin_server, name, status, code, words):
    data = json.dumps(_values_case(name))  # allow_nan: a NaN slope goes out as the NaN literal some clients write
    r = requests.post(
        f"{builtin_server}/v1/analyze", data=data, headers={"Content-Type": "application/json"}, timeout=30
    )
    _assert_error(r, status, code, words)
    _still_healthy(builtin_server)


def test_values_decode_to_the_sent_hu(builtin_server):
    """identify on the values reports the numpy statistics of the same HU pixels (rounded to whole HU on the wire)."""
    hu = np.round(chest_phantom(height=96, width=130, nodules=((48, 40, 5),)))
    ident = _post(builtin_server, ct_request(hu, task="identify", region=[30, 38, 52, 60])).json()
    inside = hu[38:60, 30:52]
    for word in (
        f"mean {inside.mean():.0f} HU",
        f"SD {inside.std():.0f}",
        f"min {inside.min():.0f}",
        f"max {inside.max():.0f}",
    ):
        assert word in ident["text"], ident["text"]


_LIMIT_HU = chest_phantom(height=64, width=80, nodules=((32, 40, 4),))


def _limit_body(png: bytes, **kw) -> dict:
    """A detect (or ground) request the built-in engine answers: a CT slice with its HU values."""
    return ct_request(_LIMIT_HU, **{"task": "detect", **kw})


LIMITS = [  # (what, extra fields, status); the defaults: max_new_tokens cap 1024, question 2000, prompt 8000 chars
    ("temperature -0.01", {"temperature": -0.01}, 400),
    ("temperature 0", {"temperature": 0.0}, 200),
    ("temperature 2", {"temperature": 2.0}, 200),
    ("temperature 2.01", {"temperature": 2.01}, 400),
    ("max_new_tokens 0", {"max_new_tokens": 0}, 400),
    ("max_new_tokens 1", {"max_new_tokens": 1}, 200),
    ("max_new_tokens 1024", {"max_new_tokens": 1024}, 200),
    ("max_new_tokens 1025", {"max_new_tokens": 1025}, 400),
    ("question 2000 chars", {"task": "ground", "question": "n" * 2000}, 200),
    ("question 2001 chars", {"task": "ground", "question": "n" * 2001}, 400),
    ("prompt 8000 chars", {"prompt": "p" * 8000}, 200),
    ("prompt 8001 chars", {"prompt": "p" * 8001}, 400),
]


@pytest.mark.parametrize("what,extra,status", LIMITS, ids=[x[0] for x in LIMITS])
def test_limits_at_their_edges(builtin_server, blob_png, what, extra, status):
    r = _post(builtin_server, _limit_body(blob_png, **extra))
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        _assert_error(r, status, "bad_request")
        field = next(k for k in extra if k != "task")
        assert field in r.json()["error"]["message"]


def test_identify_region_partly_outside_is_clipped_fully_outside_is_400(builtin_server, blob_png):
    """Documented in docs/api.md: a region reaching past the image is clipped to it; one wholly outside is refused."""
    n = blob_image().shape[0]
    for region, want in (
        ([-20, 200, 300, 290], [0, 200, n, n]),
        ([-5.5, -7, 40, 30], [0, 0, 40, 30]),
        ([n - 10, n - 12, n + 50, n + 60], [n - 10, n - 12, n, n]),
    ):
        r = _post(builtin_server, {"task": "identify", "image": b64(blob_png), "region": region})
        assert r.status_code == 200, r.text
        assert [f["box"] for f in r.json()["findings"]] == [pytest.approx(want)]
    for region in ([n, 0, n + 10, 10], [-30, -30, 0, 0], [0, -30, 10, 0], [10, n, 20, n + 5]):
        _assert_error(_post(builtin_server, {"task": "identify", "image": b64(blob_png), "region": region}), 400)
    _still_healthy(builtin_server)


NON_FINITE = [
    ("temperature", '"temperature": {v}'),
    ("region", '"task": "identify", "region": [1, 1, {v}, 20]'),
    ("pixel_spacing_mm", '"pixel_spacing_mm": [0.7, {v}]'),
    ("max_new_tokens", '"max_new_tokens": {v}'),
]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field,template", NON_FINITE, ids=[x[0] for x in NON_FINITE])
def test_nan_and_infinity_anywhere_are_4xx(builtin_server, blob_png, field, template, value):
    fields = template.format(v=value)
    if '"task"' not in fields:
        fields = '"task": "detect", ' + fields
    raw = ('{"image": "' + b64(blob_png) + '", ' + fields + "}").encode()
    for path, data in (
        ("/v1/analyze", raw),
        ("/v1/analyze/batch", b'{"items": [' + raw + b"]}"),
    ):
        r = requests.post(
            f"{builtin_server}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=30
        )
        assert r.status_code in (400, 422), (path, r.status_code, r.text[:200])
        assert field in r.json()["error"]["message"] or r.status_code == 422
    _still_healthy(builtin_server)
