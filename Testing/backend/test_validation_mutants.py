"""Request validation (``AnalysisService.prepare`` and its helpers in backend/service.py) and the access token check
(``GuardMiddleware`` in backend/app.py), called directly, sharp enough for mutation testing (``make mutation``): every
limit at its edge, every message word for word. The same rules over a real uvicorn server are tested in test_api.py,
test_cli_and_access.py and test_numbers_are_not_boxes.py; these run in milliseconds, so that each mutant can be
checked without a server start."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re

import numpy as np
import pytest
from MiniGPTMedSlicerLib.png import encode_png
from MiniGPTMedSlicerLib.protocol import AnalyzeRequest, HistoryTurn, ImageUpload, SliceValues

from backend.app import GuardMiddleware, _header
from backend.engines.base import AnalysisResult, Engine, EngineInfo
from backend.errors import ApiError
from backend.service import AnalysisService, _unsupported_message, image_id
from backend.settings import ServerSettings

W, H = 40, 30  # the image: 40 wide, 30 high


class _AllTasks(Engine):
    """An engine that answers every task; validation never reaches its ``analyze_batch``."""

    def __init__(
        self, engine: str = "minigptmed", tasks: tuple[str, ...] = ("report", "vqa", "detect", "ground", "identify")
    ):
        self.name, self.tasks = engine, tasks

    def load(self) -> None:
        pass

    def info(self) -> EngineInfo:
        return EngineInfo(self.name, "all-tasks", "cpu", self.tasks)

    def analyze_batch(self, inputs, stop) -> list[AnalysisResult]:
        raise AssertionError("validation only")


SETTINGS = ServerSettings(
    max_question_chars=10,
    max_prompt_chars=20,
    max_new_tokens_cap=50,
    max_history_turns=2,
    max_history_chars=30,
    image_store_entries=2,
)


def _service(settings: ServerSettings = SETTINGS, engine: str = "minigptmed", tasks=None) -> AnalysisService:
    s = AnalysisService(_AllTasks(engine, *([tasks] if tasks else [])), settings)
    s._info = s.engine.info()  # what start() records; no worker thread is needed to validate
    return s


@pytest.fixture(scope="module")
def svc() -> AnalysisService:
    return _service()


def _png(a: np.ndarray) -> str:
    return base64.b64encode(encode_png(a)).decode("ascii")


IMAGE = _png((np.arange(W * H).reshape(H, W) % 256).astype(np.uint8))
STORED = (np.arange(W * H).reshape(H, W) * 7).astype(np.uint16)


def _values(**kw) -> SliceValues:
    base = {
        "data": _png(STORED),
        "slope": 0.5,
        "intercept": -1024.0,
        "unit": "HU",
        "volume_min": None,
        "volume_max": None,
    }
    return SliceValues(**{**base, **kw})


def _req(**kw) -> AnalyzeRequest:
    return AnalyzeRequest(**{"task": "report", "image": IMAGE, **kw})


def _err(svc: AnalysisService, where: str = "", **kw) -> tuple[str, int, str]:
    with pytest.raises(ApiError) as e:
        svc.prepare(_req(**kw), where)
    return e.value.code, e.value.status, e.value.message


def _bad(svc: AnalysisService, message: str, where: str = "", **kw) -> None:
    assert _err(svc, where, **kw) == ("bad_request", 400, message)


# -- prepare: the input the engine gets ------------------------------------------------------------------------


def test_a_valid_request_becomes_exactly_this_input(svc):
    inp = svc.prepare(
        _req(
            task="identify",
            question="  what?  ",
            region=[-5, 2.5, 50, 31],
            pixel_spacing_mm=[0.5, 0.75],
            modality="  ct ",
            max_new_tokens=50,
            temperature=2.0,
            prompt="x" * 20,
            values=_values(volume_min=-1024.0, volume_max=3071.0),
            history=[HistoryTurn("q1", "a1", None), HistoryTurn("q2", "a2", "report")],
        )
    )
    assert (inp.task, inp.question, inp.prompt, inp.max_new_tokens, inp.temperature) == (
        "identify",
        "what?",
        "x" * 20,
        50,
        2.0,
    )
    assert inp.region == (0.0, 2.5, 40.0, 30.0)  # clipped to the image
    assert all(type(v) is float for v in inp.region)
    assert inp.pixel_spacing_mm == (0.5, 0.75) and all(type(v) is float for v in inp.pixel_spacing_mm)
    assert inp.modality == "CT"
    # inline with values: the id its upload would get (the engines' caches: not the shown pixels' id alone)
    assert inp.image_id == image_id(inp.image, inp.values) != inp.image.content_id()
    assert (inp.image.width, inp.image.height) == (W, H)
    assert [(t.task, t.question, t.answer) for t in inp.history] == [("vqa", "q1", "a1"), ("report", "q2", "a2")]
    v = inp.values
    assert v is not None and (v.unit, v.volume_min, v.volume_max) == ("HU", -1024.0, 3071.0)
    assert v.array.dtype == np.float32 and np.array_equal(v.array, STORED.astype(np.float32) * 0.5 - 1024.0)
    bare = svc.prepare(_req(question="   ", modality="   "))
    assert bare.image_id is None  # no values: the engine keys on the shown pixels (content_id)
    assert (bare.question, bare.region, bare.pixel_spacing_mm, bare.modality, bare.values, bare.history) == (
        None,
        None,
        None,
        None,
        None,
        (),
    )
    assert (bare.max_new_tokens, bare.temperature, bare.prompt) == (None, None, None)
    assert svc.prepare(_req(modality="abcdefghijklmnopqrst")).modality == "ABCDEFGHIJKLMNOP"  # 16 characters
    assert svc.prepare(_req(max_new_tokens=1, temperature=0.0)).max_new_tokens == 1
    assert svc.prepare(_req()).modality is None
    rgb = _png(np.zeros((H, W, 3), np.uint8))  # values go with a colour image too: its height and width count
    assert svc.prepare(_req(image=rgb, values=_values())).values is not None
    assert svc.prepare(_req(task="detect", region=[39.5, 29.5, 41, 31])).region == (39.5, 29.5, 40.0, 30.0)


def test_question_and_task():
    svc = _service()
    _bad(svc, "question is required for task 'ground': give the phrase to locate", task="ground", question="  ")
    _bad(svc, "question is required for task 'vqa': give a question", task="vqa")
    assert svc.prepare(_req(task="vqa", prompt="the prompt instead")).question is None
    _bad(svc, "question is 11 characters; the limit is 10", task="vqa", question="x" * 11)
    assert svc.prepare(_req(task="vqa", question="  " + "x" * 10 + "  ")).question == "x" * 10  # counted stripped
    _bad(svc, "items[3].question is required for task 'ground': give the phrase to locate", "items[3]", task="ground")
    builtin = _service(ServerSettings(), "builtin", ("report", "detect", "ground", "identify"))
    assert _err(builtin, task="vqa", question="what?") == (
        "not_supported",
        501,
        "task 'vqa' is not supported by the builtin engine (all-tasks); it supports: report, detect, ground, "
        "identify. Free-text questions need a vision-language model: start the backend with --engine minigptmed, "
        "--engine hf (MedGemma, Qwen-VL) or --engine openai (a vLLM/Ollama server)",
    )


def test_unsupported_task_messages():
    def info(engine):
        return EngineInfo(engine, "m", "cpu", ("report", "vqa"))

    assert _unsupported_message("detect", info("minigptmed")) == (
        "task 'detect' is not supported by the minigptmed engine (m); it supports: report, vqa"
    )
    for engine in ("hf", "openai"):
        assert _unsupported_message("ground", info(engine)) == (
            f"task 'ground' is not supported by the {engine} engine (m); it supports: report, vqa. Boxes need a model "
            "family with a box format: --family medgemma, qwen2_5_vl, qwen3_vl or medmo"
        )
    assert _unsupported_message("report", info("hf")).endswith("it supports: report, vqa")
    assert _unsupported_message("vqa", info("hf")).endswith("it supports: report, vqa")


def test_prompt_tokens_and_temperature_at_their_edges(svc):
    _bad(svc, "prompt is 21 characters; the limit is 20", prompt="y" * 21)
    for n in (0, 51, -1):
        _bad(svc, "max_new_tokens must be between 1 and 50", max_new_tokens=n)
    for t in (-0.001, 2.001, math.nan, math.inf, -math.inf):
        _bad(svc, "temperature must be between 0 and 2 (0 = greedy)", temperature=t)
    _bad(svc, "b.temperature must be between 0 and 2 (0 = greedy)", "b", temperature=-1.0)
    with pytest.raises(ApiError) as e:  # no prefix by default
        svc.prepare(_req(temperature=-1.0))
    assert e.value.message == "temperature must be between 0 and 2 (0 = greedy)"


def test_pixel_spacing(svc):
    msg = "pixel_spacing_mm must be [row, col], two positive numbers of millimetres"
    for sp in (
        [0.0, 1.0],
        [1.0, 0.0],
        [1.0, 1000.0],
        [1000.0, 1.0],
        [1.0],
        [1.0, 1.0, 1.0],
        [math.nan, 1.0],
        [-1.0, 1.0],
    ):
        _bad(svc, msg, pixel_spacing_mm=sp)
    assert svc.prepare(_req(pixel_spacing_mm=[999.9, 0.01])).pixel_spacing_mm == (999.9, 0.01)


def test_region(svc):
    _bad(svc, "region [x0, y0, x1, y1] (pixels) is required for task 'identify'", task="identify")
    for r in ([1, 2, 3], [1, 2, 3, 4, 5], [math.nan, 0, 5, 5], [0, 0, math.inf, 5]):
        _bad(svc, "region must be [x0, y0, x1, y1] in pixels", task="detect", region=r)
    for r in ([5, 0, 5, 5], [0, 5, 5, 5], [6, 0, 5, 5], [0, 6, 5, 5]):
        _bad(svc, "region must have x0 < x1 and y0 < y1", task="identify", region=r)
    for r in ([-10, 0, 0, 10], [0, -10, 10, 0], [40, 0, 50, 10], [0, 30, 10, 40]):
        _bad(svc, f"region {r} lies outside the 40x30 image", task="identify", region=r)
    assert svc.prepare(_req(task="identify", region=[-10, -10, 0.5, 0.5])).region == (0.0, 0.0, 0.5, 0.5)
    assert svc.prepare(_req(task="identify", region=[39.9, 29.9, 45, 35])).region == (39.9, 29.9, 40.0, 30.0)
    assert svc.prepare(_req(task="identify", region=[1, 2, 3, 4])).region == (1.0, 2.0, 3.0, 4.0)


def test_history_limits(svc):
    turns = [HistoryTurn("q", "a", None)] * 3
    _bad(svc, "history has 3 turns; the limit is 2: start a new conversation", history=turns)
    ok = [HistoryTurn("q" * 10, "a" * 5, None), HistoryTurn("q" * 10, "a" * 5, "vqa")]  # 30 characters
    assert len(svc.prepare(_req(history=ok)).history) == 2
    long = [HistoryTurn("q" * 10, "a" * 5, None), HistoryTurn("q" * 10, "a" * 6, None)]
    assert _err(svc, "h", history=long) == (
        "too_large",
        413,
        "h.history is 31 characters; the limit is 30: start a new conversation",
    )


# -- the image, its values, the image store ------------------------------------------------------------------------


def test_image_or_image_id():
    svc = _service()
    assert _err(svc, image_id="ab" * 32) == ("bad_request", 400, "give either image or image_id, not both")
    assert _err(svc, image=None) == (
        "bad_request",
        400,
        "image (base64 PNG/JPEG) or image_id (from POST /v1/images) is required",
    )
    stored = svc.store_image(ImageUpload(image=IMAGE, values=_values()))
    assert (stored.width, stored.height) == (W, H) and len(stored.image_id) == 64
    assert _err(svc, image=None, image_id=stored.image_id, values=_values()) == (
        "bad_request",
        400,
        "values belong to the image upload (POST /v1/images), not to image_id",
    )
    inp = svc.prepare(_req(image=None, image_id=stored.image_id))
    assert inp.image_id == stored.image_id and inp.values is not None and inp.values.unit == "HU"
    assert (inp.image.width, inp.image.height) == (W, H)
    assert _err(svc, image=None, image_id="0123456789abcdef" + "0" * 48) == (
        "image_not_found",
        404,
        "no image is stored under image_id 0123456789abcdef...: upload it",
    )
    others = [svc.store_image(ImageUpload(image=_png(np.full((3, 4), k, np.uint8)))) for k in (1, 2)]
    assert len({o.image_id for o in others} | {stored.image_id}) == 3
    assert (
        _err(svc, "x", image=None, image_id=stored.image_id)
        == (  # the oldest of three in a store of two
            "image_expired",
            410,
            f"x.image_id {stored.image_id[:16]}... was evicted from the image store: upload it again",
        )
    )
    # the id is of the pixels and the values: the same image with other values is another image
    ids = {svc.store_image(ImageUpload(image=IMAGE, values=v)).image_id for v in (None, _values(), _values(unit="raw"))}
    assert len(ids) == 3
    with pytest.raises(ApiError) as e:  # an upload's errors name the field without a prefix
        svc.store_image(ImageUpload(image=IMAGE, values=_values(slope=0.0)))
    assert e.value.message == "values.slope must be a finite, nonzero number; got 0.0"
    small = _service(ServerSettings(image_store_bytes=1000))
    with pytest.raises(ApiError) as e:
        small.store_image(ImageUpload(image=IMAGE))
    assert (e.value.code, e.value.message) == (
        "too_large",
        "the decoded image is 1,200 bytes; the image store holds 1,000",
    )
    # the values count too: 1,200 bytes of pixels + 1,200 float32 values
    _service(ServerSettings(image_store_bytes=6000)).store_image(ImageUpload(image=IMAGE, values=_values()))
    with pytest.raises(ApiError) as e:
        _service(ServerSettings(image_store_bytes=5999)).store_image(ImageUpload(image=IMAGE, values=_values()))
    assert e.value.message == "the decoded image is 6,000 bytes; the image store holds 5,999"


def test_values(svc):
    def bad_values(message: str, code: str = "bad_request", **kw) -> None:
        assert _err(svc, "v", values=_values(**kw)) == (code, 400, "v." + message)

    for slope in (0.0, math.nan, math.inf):
        bad_values(f"values.slope must be a finite, nonzero number; got {slope}", slope=slope)
    bad_values("values.slope must be a finite, nonzero number; got 1", slope="1")
    for name in ("intercept", "volume_min", "volume_max"):
        for x in (math.nan, math.inf):
            bad_values(f"values.{name} must be a finite number; got {x}", **{name: x})
    bad_values("values.unit must be 'HU' or 'raw'; got 'K'", unit="K")
    kind = "values.data must be a 16-bit grayscale PNG (lossless); got a {}"
    bad_values(kind.format("8-bit gray PNG"), "bad_image", data=_png(np.zeros((H, W), np.uint8)))
    bad_values(kind.format("RGB PNG"), "bad_image", data=_png(np.zeros((H, W, 3), np.uint8)))
    bad_values(
        "values.data is 3x2 pixels but image is 40x30: the values must be resliced with exactly the image's geometry",
        "bad_image",
        data=_png(np.zeros((2, 3), np.uint16)),
    )
    bad_values(
        "values.data is 30x40 pixels but image is 40x30: the values must be resliced with exactly the image's geometry",
        "bad_image",
        data=_png(np.zeros((W, H), np.uint16)),
    )
    bad_values("values.data is empty: send a base64-encoded PNG or JPEG", "bad_image", data="")
    assert _err(svc, "q", image="") == ("bad_image", 400, "q.image is empty: send a base64-encoded PNG or JPEG")
    assert _err(svc, image="@@") == ("bad_image", 400, "image is not valid base64")
    raw = svc.prepare(_req(values=_values(unit="raw", slope=-2, intercept=0, volume_min=-5.0, volume_max=0.0))).values
    assert raw is not None and (raw.unit, raw.volume_min, raw.volume_max) == ("raw", -5.0, 0.0)
    assert np.array_equal(raw.array, STORED.astype(np.float32) * -2)


# -- the access token and the body limit (GuardMiddleware) ------------------------------------------------------


def _scope(path: str, auth: bytes | None = None, length: bytes | None = None, method: str = "GET") -> dict:
    headers = [(b"host", b"127.0.0.1")]
    if auth is not None:
        headers.append((b"authorization", auth))
    if length is not None:
        headers.append((b"content-length", length))
    return {"type": "http", "method": method, "path": path, "headers": headers}


UNAUTHORIZED = ("unauthorized", "missing or wrong access token: send 'Authorization: Bearer <token>'")


def _check(guard: GuardMiddleware, scope: dict):
    e = guard._check(scope)
    return None if e is None else (e.code, e.message)


def test_the_token_on_every_route_but_health_and_the_docs():
    guard = GuardMiddleware(None, ServerSettings(token="s3cret", max_body_bytes=100))
    for path in ("/v1/analyze", "/v1/analyze/batch", "/v1/models", "/v1/chat/completions", "/v1/images", "/healthz"):
        assert _check(guard, _scope(path)) == UNAUTHORIZED, path
        assert _check(guard, _scope(path, b"Bearer s3cret")) is None, path
    for auth in (b"Bearer wrong", b"Basic s3cret", b"Bearer", b"Bearer s3cret2", b"s3cret", b"Bearer s3cre\xe9", b""):
        assert _check(guard, _scope("/v1/analyze", auth)) == UNAUTHORIZED, auth
    for auth in (b"bearer s3cret", b"BEARER s3cret", b"Bearer  s3cret "):
        assert _check(guard, _scope("/v1/analyze", auth)) is None, auth
    for path in ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/docs-assets/swagger-ui.css"):
        assert _check(guard, _scope(path)) is None, path
    for path in ("/docs-assets", "/docs-assetsx/a.js", "/docs/x", "/health/x"):
        assert _check(guard, _scope(path)) == UNAUTHORIZED, path
    # the token is checked before the body's size
    assert _check(guard, _scope("/v1/analyze", None, b"1000", "POST")) == UNAUTHORIZED
    assert _check(GuardMiddleware(None, ServerSettings()), _scope("/v1/analyze")) is None  # no token configured


def test_content_length_limits():
    guard = GuardMiddleware(None, ServerSettings(max_body_bytes=100))
    assert _check(guard, _scope("/v1/analyze", length=b"100")) is None
    assert _check(guard, _scope("/v1/analyze", length=b"0")) is None
    assert _check(guard, _scope("/v1/analyze", length=b"101")) == (
        "too_large",
        "request body is 101 bytes; the limit is 100",
    )
    assert _check(GuardMiddleware(None, ServerSettings(max_body_bytes=1000)), _scope("/", length=b"1234567")) == (
        "too_large",
        "request body is 1,234,567 bytes; the limit is 1,000",
    )
    for bad in (b"abc", b"-1", b""):
        assert _check(guard, _scope("/v1/analyze", length=bad)) == ("bad_request", "invalid Content-Length"), bad


def _asgi(settings: ServerSettings, scope: dict, messages: list[dict], app_fails: bool = False, app_headers=True):
    """One request through GuardMiddleware around a tiny ASGI app that reads the body as an app does (until
    ``more_body`` is false), then asks once more (a disconnect check), notes a log field and answers "ok"."""
    got: dict = {}

    async def app(scope, receive, send):
        got["path"], got["rid"] = scope["path"], scope["state"]["rid"]
        scope["state"]["log"].update(task="report", rows=2)
        body = b""
        while True:
            m = await receive()
            assert m["type"] == "http.request", m
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        got["body"], got["after"] = body, (await receive())["type"]
        if app_fails:
            raise RuntimeError("engine bug")
        start = {"type": "http.response.start", "status": 201}
        if app_headers:
            start["headers"] = [(b"content-type", b"text/plain")]
        await send(start)
        await send({"type": "http.response.body", "body": b"ok"})

    queue = list(messages)
    sent: list[dict] = []

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    asyncio.run(GuardMiddleware(app, settings)(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body, got


def _chunks(*parts: bytes) -> list[dict]:
    return [{"type": "http.request", "body": c, "more_body": i < len(parts) - 1} for i, c in enumerate(parts)]


S = ServerSettings(token="t", max_body_bytes=10)
POST = _scope("/v1/analyze", b"Bearer t", None, "POST")


def test_guard_reads_a_body_without_length_up_to_the_limit(caplog):
    caplog.set_level(logging.INFO, "minigptmed.access")
    status, headers, body, got = _asgi(S, POST, _chunks(b"12345", b"67890"))  # exactly the limit
    assert (status, body, got["body"], got["after"], got["path"]) == (
        201,
        b"ok",
        b"1234567890",
        "http.disconnect",
        "/v1/analyze",
    )
    assert headers[b"content-type"] == b"text/plain"  # the app's own headers kept, the request id added
    rid = headers[b"x-request-id"].decode()
    assert re.fullmatch(r"\d+-[0-9a-f]{12}", rid) and got["rid"] == rid
    (rec,) = [r for r in caplog.records if r.name == "minigptmed.access"]
    msg = rec.getMessage()
    assert re.fullmatch(
        rf"request id={rid} method=POST path=/v1/analyze status=201 ms=(\d+\.\d) task=report rows=2", msg
    )
    assert float(msg.split("ms=")[1].split()[0]) < 60_000
    status, _, body, got = _asgi(S, POST, _chunks(b"123456", b"78901"))
    assert status == 413 and "body" not in got and b"request body exceeds 10 bytes" in body
    put = _scope("/v1/analyze", b"Bearer t", None, "PUT")
    assert _asgi(S, put, _chunks(b"123456", b"78901"))[0] == 413
    status, _, _, got = _asgi(S, POST, [{"type": "http.request"}, {"type": "http.request", "body": b"late"}])
    assert (status, got["body"]) == (201, b"")  # no body key, no more_body key: an empty body, and the end
    status, _, _, got = _asgi(
        S, POST, [{"type": "http.request", "body": b"ab"}, {"type": "http.request", "body": b"cd"}]
    )
    assert (status, got["body"]) == (201, b"ab")
    # the client went away before sending anything: the app gets an empty body, then the disconnect
    status, _, _, got = _asgi(S, POST, [{"type": "http.disconnect"}])
    assert (status, got["body"], got["after"]) == (201, b"", "http.disconnect")


def test_guard_rejections_and_pass_through(caplog):
    caplog.set_level(logging.INFO, "minigptmed.access")
    status, _, body, got = _asgi(S, _scope("/v1/analyze", None, None, "POST"), _chunks(b"1"))
    assert (
        status == 401
        and got == {}
        and json.loads(body) == {"error": {"code": "unauthorized", "message": UNAUTHORIZED[1]}}
    )
    status, _, body, _ = _asgi(S, _scope("/v1/chat/completions", b"Bearer x", None, "POST"), _chunks(b"{}"))
    err = json.loads(body)["error"]  # OpenAI's shape on its routes
    assert status == 401 and set(err) == {"message", "type", "code", "param"} and err["message"] == UNAUTHORIZED[1]
    assert "status=401" in caplog.records[-1].getMessage()
    # with a Content-Length the body is not read here (the HTTP parser holds the client to it)
    status, _, _, got = _asgi(S, _scope("/v1/analyze", b"Bearer t", b"3", "POST"), _chunks(b"abc", b"defghijklmn"))
    assert (status, got["body"]) == (201, b"abcdefghijklmn")
    status, headers, _, got = _asgi(S, _scope("/health"), _chunks(b""), app_headers=False)
    assert (status, got["body"], list(headers)) == (201, b"", [b"x-request-id"])  # a start without headers
    with pytest.raises(RuntimeError):
        _asgi(S, POST, _chunks(b"x"), app_fails=True)
    assert "path=/v1/analyze status=500" in caplog.records[-1].getMessage()
    seen: list = []

    async def inner(scope, receive, send):
        seen.append((scope, receive, send))

    lifespan, rcv, snd = {"type": "lifespan"}, object(), object()
    asyncio.run(GuardMiddleware(inner, S)(lifespan, rcv, snd))
    assert seen == [(lifespan, rcv, snd)] and "state" not in lifespan


def test_header_lookup():
    assert _header({}, b"authorization") is None
    scope = {"headers": [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]}
    assert (_header(scope, b"a"), _header(scope, b"b"), _header(scope, b"c")) == (b"1", b"2", None)
