"""The HTTP API against a real uvicorn server with the built-in engine: happy paths and every bad input
the foundation issue lists. After each bad request the server must still answer /health."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import requests
from conftest import b64, blob_image
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


def test_detect_finds_the_blobs_in_pixels_of_the_sent_image(builtin_server, blob_png):
    r = _post(
        builtin_server, {"task": "detect", "image": b64(blob_png), "modality": "CT", "pixel_spacing_mm": [0.5, 0.5]}
    )
    resp = protocol.from_dict(protocol.AnalyzeResponse, r.json())
    assert resp.engine == "builtin" and resp.task == "detect"
    labels = sorted(f.label for f in resp.findings)
    assert labels == ["hyperdense region", "hypodense region"]
    bright = next(f for f in resp.findings if f.label == "hyperdense region")
    x0, y0, x1, y1 = bright.box
    assert abs((x0 + x1) / 2 - 90) <= 1.5 and abs((y0 + y1) / 2 - 100) <= 1.5  # blob centre (cx=90, cy=100)
    assert 18 <= x1 - x0 <= 23 and 18 <= y1 - y0 <= 23  # diameter 19-20 px
    assert "mm" in resp.text and "not a diagnosis" in resp.text
    assert resp.raw_output
    assert resp.timings_ms["engine"] > 0


def test_jpeg_and_rgb_and_16bit_are_accepted(builtin_server):
    img = blob_image()
    buf = io.BytesIO()
    Image.fromarray(np.repeat(img[:, :, None], 3, axis=2)).save(buf, format="JPEG", quality=95)
    r = _post(builtin_server, {"task": "detect", "image": b64(buf.getvalue())})
    assert r.status_code == 200 and len(r.json()["findings"]) == 2
    img16 = blob_image(dtype=np.uint16, base=1000.0, blobs=((100, 90, 10, 600), (160, 170, 8, -500)), noise=50)
    r = _post(builtin_server, {"task": "detect", "image": b64(encode_png(img16)), "modality": "MR"})
    assert r.status_code == 200
    assert sorted(f["label"] for f in r.json()["findings"]) == ["hyperintense region", "hypointense region"]


def test_report_ground_identify(builtin_server, blob_png):
    rep = _post(builtin_server, {"task": "report", "image": b64(blob_png), "modality": "CT"}).json()
    assert "2 region(s)" in rep["text"] and "not a diagnosis" in rep["text"]
    g = _post(builtin_server, {"task": "ground", "image": b64(blob_png), "question": "the hypodense lesion"}).json()
    assert len(g["findings"]) == 1 and g["findings"][0]["label"] == "the hypodense lesion"
    gx = (g["findings"][0]["box"][0] + g["findings"][0]["box"][2]) / 2
    assert abs(gx - 170) <= 2  # the dark blob, not the bright one
    ident = _post(
        builtin_server, {"task": "identify", "image": b64(blob_png), "region": [78, 88, 102, 112], "modality": "CT"}
    ).json()
    assert ident["findings"][0]["label"] == "hyperdense region"
    assert ident["findings"][0]["box"] == [78, 88, 102, 112]


def test_batch_matches_single_requests(builtin_server, blob_png):
    other = encode_png(blob_image(blobs=((60, 60, 6, 70),), seed=3))
    items = [{"task": "detect", "image": b64(p)} for p in (blob_png, other, blob_png)]
    batch = requests.post(f"{builtin_server}/v1/analyze/batch", json={"items": items}, timeout=60)
    results = protocol.from_dict(protocol.BatchResponse, batch.json()).results
    singles = [_post(builtin_server, it).json() for it in items]
    assert [[f.box for f in r.findings] for r in results] == [[f["box"] for f in s["findings"]] for s in singles]


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
    ("missing image", lambda png: {"task": "detect"}, 422, "invalid_schema"),
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
        builtin_server, {"task": "detect", "image": "data:image/png;base64," + base64.b64encode(blob_png).decode()}
    )
    assert r.status_code == 200


def test_openapi_docs_are_served(builtin_server):
    assert requests.get(f"{builtin_server}/docs", timeout=10).status_code == 200
    spec = requests.get(f"{builtin_server}/openapi.json", timeout=10).json()
    assert "/v1/analyze" in spec["paths"] and "/v1/analyze/batch" in spec["paths"]
