"""The FastAPI application: routes, error shape, access token, body limit, one log line per request."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline
from MiniGPTMedSlicerLib.protocol import (
    REQUEST_ID_HEADER,
    STREAM_DELTA,
    STREAM_DONE,
    STREAM_ERROR,
    AnalyzeRequest,
    AnalyzeResponse,
    BatchRequest,
    BatchResponse,
    CancelResult,
    ErrorBody,
    Health,
    ImageUpload,
    StoredImage,
    format_event,
    status_descriptions,
    to_dict,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .engines.base import AnalysisInput, Engine
from .errors import ApiError
from .findings import MAX_TEXT_CHARS, clean_text
from .openai_routes import add_openai_routes, is_openai_path, openai_error_body
from .service import AnalysisService, _Job
from .settings import ServerSettings

log = logging.getLogger("minigptmed.access")

_ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorBody, "description": desc}
    for status, desc in status_descriptions((400, 401, 404, 410, 413, 422, 499, 501, 503, 504)).items()
}
_request_ids = itertools.count(1)
_RID_HEADER = REQUEST_ID_HEADER.lower().encode()

#: Swagger UI's assets, served by this server from the fastapi-offline package (no CDN: /docs works air-gapped).
DOCS_ASSETS = "/docs-assets"
#: Reachable without the access token: the health check and the API's own documentation (the schema holds no data
#: and no secret; every request made from /docs still needs the token, entered with its Authorize button).
OPEN_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json")


def error_response(err: ApiError, path: str = "") -> JSONResponse:
    """The error in the native shape, or in OpenAI's on the OpenAI-compatible routes."""
    body = openai_error_body(err) if is_openai_path(path) else err.body()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def create_app(
    engine: Engine,
    settings: ServerSettings | None = None,
    extra_routes: Callable[[FastAPI, AnalysisService], None] | None = None,
) -> FastAPI:
    """Build the app around an engine. The engine is loaded when the app starts (lifespan), not here."""
    settings = settings or ServerSettings()
    service = AnalysisService(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await asyncio.get_running_loop().run_in_executor(None, service.start)
        except Exception as e:
            app.state.start_error = e  # the command line reports it in its own words
            raise
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.stop)

    app = FastAPIOffline(
        title="MiniGPTMedSlicer backend",
        version=__version__,
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
        redoc_url=None,
        # with a token: declared in the schema (the Authorize button of /docs); GuardMiddleware checks it
        dependencies=[Depends(HTTPBearer(auto_error=False))] if settings.token else None,
        description="Image in, findings text and boxes (pixels of the sent image) out. "
        "All patient-space geometry stays in Slicer.",
    )
    app.state.service = service
    app.state.settings = settings

    # -- errors in one shape ----------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if is_openai_path(request.url.path) and any(e.get("type") == "json_invalid" for e in errors):
            return error_response(ApiError("invalid_json", "the body is not JSON"), request.url.path)
        parts = []
        for e in errors[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
        err = ApiError("invalid_schema", "; ".join(parts) or "request does not match the schema")
        return error_response(err, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "bad_request", 413: "too_large"}.get(exc.status_code, "bad_request")
        return error_response(ApiError(code, str(exc.detail), status=exc.status_code), request.url.path)

    app.add_middleware(GuardMiddleware, settings=settings)

    # -- routes -----------------------------------------------------------------------------
    @app.get("/health", response_model=Health, responses=_ERROR_RESPONSES, tags=["service"])
    async def health() -> Health:
        return service.health()

    @app.post("/v1/images", response_model=StoredImage, responses=_ERROR_RESPONSES, tags=["analyze"])
    async def upload_image(body: ImageUpload, request: Request) -> StoredImage:
        stored = await asyncio.get_running_loop().run_in_executor(None, service.store_image, body)
        request.state.log.update(w=stored.width, h=stored.height)
        return stored

    @app.post(
        "/v1/analyze",
        response_model=AnalyzeResponse,
        responses={**_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
        tags=["analyze"],
    )
    async def analyze(body: AnalyzeRequest, request: Request):
        t0 = time.perf_counter()
        inp = await asyncio.get_running_loop().run_in_executor(None, service.prepare, body)
        t1 = time.perf_counter()
        request.state.log.update(task=inp.task, engine=service.info.engine, w=inp.image.width, h=inp.image.height)
        rid = request.state.rid
        if body.stream:
            return _stream(service, inp, rid, t1 - t0, request.state.log)
        job = service.submit([inp], rid)
        (result,) = await service.wait(job, request.is_disconnected)
        t2 = time.perf_counter()
        resp = service.respond(inp, result, {"decode": (t1 - t0) * 1000, "engine": (t2 - t1) * 1000})
        request.state.log.update(findings=len(resp.findings), engine_ms=f"{(t2 - t1) * 1000:.1f}")
        return resp

    @app.delete("/v1/requests/{request_id}", response_model=CancelResult, responses=_ERROR_RESPONSES, tags=["analyze"])
    async def cancel_request(request_id: str) -> CancelResult:
        if not service.cancel(request_id):
            raise ApiError("request_not_found", f"no running request with id {request_id[:40]!r} (finished or unknown)")
        return CancelResult(request_id=request_id, cancelled=True)

    @app.post("/v1/analyze/batch", response_model=BatchResponse, responses=_ERROR_RESPONSES, tags=["analyze"])
    async def analyze_batch(body: BatchRequest, request: Request) -> BatchResponse:
        if not body.items:
            raise ApiError("bad_request", "items is empty")
        if any(it.stream for it in body.items):
            raise ApiError("bad_request", "stream is for a single /v1/analyze, not for batch items")
        if len(body.items) > settings.max_batch_items:
            raise ApiError("too_large", f"{len(body.items)} items; the limit is {settings.max_batch_items} per batch")
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        inputs = await loop.run_in_executor(
            None, lambda: [service.prepare(it, f"items[{i}]") for i, it in enumerate(body.items)]
        )
        t1 = time.perf_counter()
        request.state.log.update(
            task=",".join(sorted({i.task for i in inputs})), items=len(inputs), engine=service.info.engine
        )
        results = await service.run(inputs, request.is_disconnected)
        t2 = time.perf_counter()
        per = {"decode": (t1 - t0) * 1000 / len(inputs), "engine": (t2 - t1) * 1000 / len(inputs)}
        out = [service.respond(i, r, per) for i, r in zip(inputs, results, strict=True)]
        return BatchResponse(results=out, timings_ms={"decode": (t1 - t0) * 1000, "engine": (t2 - t1) * 1000})

    add_openai_routes(app, service)
    if extra_routes is not None:
        extra_routes(app, service)
    return app


def _stream(service: AnalysisService, inp: AnalysisInput, rid: str, decode_s: float, log_fields: dict):
    """``"stream": true``: queue the request now (a full queue is still a 503 JSON answer), then answer with
    server-sent events: ``delta`` pieces as the engine decodes them, then ``done`` with the whole AnalyzeResponse,
    or ``error`` with the error body. A client that goes away cancels the request (its batch row is dropped)."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()

    def on_text(text: str) -> None:
        text = clean_text(text, MAX_TEXT_CHARS)  # as the final text is cleaned (control characters dropped)
        if text:
            loop.call_soon_threadsafe(pieces.put_nowait, text)

    inp.on_text = on_text
    t1 = time.perf_counter()
    job = service.submit([inp], rid)
    return StreamingResponse(
        _events(service, job, inp, pieces, decode_s, t1, log_fields),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(service: AnalysisService, job: _Job, inp: AnalysisInput, pieces, decode_s, t1, log_fields):
    sent: list[str] = []
    finished = False
    getter: asyncio.Future | None = None
    try:
        getter = asyncio.ensure_future(pieces.get())
        while True:
            done, _ = await asyncio.wait({getter, job.future}, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                text = getter.result()
                sent.append(text)
                yield format_event(STREAM_DELTA, {"text": text})
                getter = asyncio.ensure_future(pieces.get())
                continue
            if job.future.done():
                break
            if service.timed_out(job):
                finished = True
                yield format_event(STREAM_ERROR, service.timeout_error().body())
                return
        getter.cancel()
        while not pieces.empty():
            text = pieces.get_nowait()
            sent.append(text)
            yield format_event(STREAM_DELTA, {"text": text})
        finished = True
        try:
            (result,) = job.future.result()
        except ApiError as e:
            log_fields.update(stream_error=e.code)
            yield format_event(STREAM_ERROR, e.body())
            return
        t2 = time.perf_counter()
        resp = service.respond(inp, result, {"decode": decode_s * 1000, "engine": (t2 - t1) * 1000})
        final, so_far = resp.raw_output or resp.text, "".join(sent)
        if final.startswith(so_far) and len(final) > len(so_far):  # engines that do not stream: the rest at once
            yield format_event(STREAM_DELTA, {"text": final[len(so_far) :]})
        log_fields.update(findings=len(resp.findings), deltas=len(sent), engine_ms=f"{(t2 - t1) * 1000:.1f}")
        yield format_event(STREAM_DONE, to_dict(resp))
    finally:
        if getter is not None:  # a client that went away left it waiting for the next piece
            getter.cancel()
        if not finished:  # the client went away (the generator was closed): stop the model
            service.cancel_job(job)
            log_fields.update(cancelled="disconnect")
        service.forget(job)


class GuardMiddleware:
    """Pure ASGI middleware (keeps client-disconnect detection working): access token, body size limit, and one
    structured log line per request. Never logs pixels or question text."""

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = f"{next(_request_ids)}-{secrets.token_hex(6)}"
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        state["rid"] = rid
        state["log"] = {}
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (_RID_HEADER, rid.encode())]}
            await send(message)

        try:
            rejection = self._check(scope)
            if rejection is None and scope["method"] in ("POST", "PUT") and _header(scope, b"content-length") is None:
                body, rejection = await self._read_limited(receive)
                if rejection is None:
                    receive = _replay(body, receive)
            if rejection is not None:
                await error_response(rejection, scope["path"])(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            extra = " ".join(f"{k}={v}" for k, v in state["log"].items())
            log.info(
                "request id=%s method=%s path=%s status=%d ms=%.1f %s",
                rid,
                scope["method"],
                scope["path"],
                status[0],
                (time.perf_counter() - t0) * 1000,
                extra,
            )

    def _check(self, scope) -> ApiError | None:
        s = self.settings
        path = scope["path"]
        if s.token and path not in OPEN_PATHS and not path.startswith(DOCS_ASSETS + "/"):
            header = (_header(scope, b"authorization") or b"").decode("latin-1")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), s.token.encode()):
                return ApiError("unauthorized", "missing or wrong access token: send 'Authorization: Bearer <token>'")
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0:
                return ApiError("bad_request", "invalid Content-Length")
            if n > s.max_body_bytes:
                return ApiError("too_large", f"request body is {n:,} bytes; the limit is {s.max_body_bytes:,}")
        return None

    async def _read_limited(self, receive) -> tuple[bytes, ApiError | None]:
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.settings.max_body_bytes:
                return b"", ApiError("too_large", f"request body exceeds {self.settings.max_body_bytes:,} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
