"""The wire schema is defined once: the server's OpenAPI schema and the client's validator must agree with it."""

from __future__ import annotations

import dataclasses

import pytest
import requests
from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib.png import decode_png, encode_png


@pytest.mark.parametrize(
    "cls",
    [
        protocol.AnalyzeRequest,
        protocol.AnalyzeResponse,
        protocol.Finding,
        protocol.Health,
        protocol.BatchRequest,
        protocol.BatchResponse,
        protocol.ErrorBody,
    ],
)
def test_server_schema_has_exactly_the_protocol_fields(builtin_server, cls):
    spec = requests.get(f"{builtin_server}/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    # FastAPI may suffix names with -Input/-Output when a model is used both ways
    candidates = [v for k, v in schemas.items() if k == cls.__name__ or k.startswith(cls.__name__ + "-")]
    assert candidates, f"{cls.__name__} missing from the OpenAPI schema: {sorted(schemas)}"
    fields = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    for schema in candidates:
        assert set(schema["properties"]) == fields
        assert required <= set(schema.get("required", []))


def test_task_enum_matches(builtin_server):
    spec = requests.get(f"{builtin_server}/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    req = next(v for k, v in schemas.items() if k.startswith("AnalyzeRequest"))
    assert set(req["properties"]["task"]["enum"]) == set(protocol.TASKS)


def test_round_trip_and_validation_errors():
    req = protocol.AnalyzeRequest(
        task="ground",
        image="AAAA",
        question="left lung nodule",
        region=[1, 2, 3, 4.5],
        pixel_spacing_mm=[0.7, 0.7],
        modality="CT",
        max_new_tokens=50,
        temperature=0.0,
    )
    d = protocol.to_dict(req)
    assert protocol.from_dict(protocol.AnalyzeRequest, d) == req
    assert "prompt" not in d  # None-valued optional fields are not sent
    with pytest.raises(protocol.ProtocolError, match="task"):
        protocol.from_dict(protocol.AnalyzeRequest, {**d, "task": "segment"})
    with pytest.raises(protocol.ProtocolError, match="unknown field"):
        protocol.from_dict(protocol.AnalyzeRequest, {**d, "patient_name": "X"})
    with pytest.raises(protocol.ProtocolError, match=r"findings\[0\].box\[1\]"):
        protocol.from_dict(
            protocol.AnalyzeResponse,
            {
                "task": "detect",
                "engine": "e",
                "model": "m",
                "text": "",
                "findings": [{"label": "a", "box": [0, "x", 1, 1]}],
            },
        )
    with pytest.raises(protocol.ProtocolError, match="field required"):
        protocol.from_dict(protocol.Finding, {"label": "a"})
    with pytest.raises(protocol.ProtocolError, match="finite"):
        protocol.from_dict(protocol.Finding, {"label": "a", "box": [0, 0, float("nan"), 1]})


def test_box_validity_rule():
    assert protocol.box_is_valid([0, 0, 10, 10], 10, 10)
    assert not protocol.box_is_valid([5, 0, 5, 10], 10, 10)
    assert not protocol.box_is_valid([0, 0, 11, 10], 10, 10)
    assert not protocol.box_is_valid([0, 0, 1], 10, 10)


@pytest.mark.parametrize("shape,dtype", [((7, 5), "uint8"), ((4, 9), "uint16"), ((3, 6, 3), "uint8")])
def test_png_codec_round_trip_and_pillow_agrees(shape, dtype):
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    a = rng.integers(0, 255 if dtype == "uint8" else 65535, size=shape).astype(dtype)
    data = encode_png(a)
    assert np.array_equal(decode_png(data), a)
    pil = np.asarray(Image.open(io.BytesIO(data)))
    assert np.array_equal(pil.astype(a.dtype), a)
    # and our decoder reads Pillow's (adaptive-filter) PNGs
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    assert np.array_equal(decode_png(buf.getvalue()), a)


def test_task_table_is_the_one_vocabulary():
    assert protocol.TASKS == ("report", "vqa", "detect", "ground", "identify")
    assert protocol.BOX_TASKS == ("detect", "ground", "identify")
    assert protocol.task_by_label("Locate") is protocol.GROUND and protocol.task_by_label("Sweep volume") is None
    assert protocol.missing_input("vqa", "  ", None) == "question"
    assert protocol.missing_input("ground", "left lung", None) is None
    assert protocol.missing_input("identify", None, None) == "region"
    assert protocol.missing_input("identify", None, [0, 0, 1, 1]) is None
    assert protocol.missing_input("detect", None, None) is None
    with pytest.raises(KeyError, match="choose one of report, vqa"):
        protocol.task_spec("segment")


def test_error_table_gives_each_code_one_status():
    assert protocol.ERROR_STATUS["unauthorized"] == 401 and protocol.ERROR_STATUS["too_large"] == 413
    assert len({e.code for e in protocol.ERROR_TABLE}) == len(protocol.ERROR_TABLE)
    assert all(
        e.openai_type == ("server_error" if e.status >= 500 else "invalid_request_error") for e in protocol.ERROR_TABLE
    )
    assert protocol.DEFAULT_URL == "http://127.0.0.1:8765"
