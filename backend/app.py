"""The FastAPI application: routes, error shape, access token, body limit, one log line per request."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from MiniGPTMedSlicerLib.protocol import (
    AnalyzeRequest,
    AnalyzeResponse,
    BatchRequest,
    BatchResponse,
    ErrorBody,
    Health,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .engines.base import Engine
from .errors import ApiError
from .service import AnalysisService
from .settings import ServerSettings

log = logging.getLogger("minigptmed.access")

_ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"model": ErrorBody, "description": desc}
    for code, desc in [(400, "bad image or field"), (401, "missing or wrong access token"), (413, "too large"),
                       (422, "does not match the schema"), (501, "task not supported by this engine"),
                       (503, "engine not ready, busy or failed; see Retry-After"), (504, "time limit reached")]
}
_request_ids = itertools.count(1)


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(engine: Engine, settings: ServerSettings | None = None,
               extra_routes: Callable[[FastAPI, AnalysisService], None] | None = None) -> FastAPI:
    """Build the app around an engine. The engine is loaded when the app starts (lifespan), not here."""
    settings = settings or ServerSettings()
    service = AnalysisService(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.get_running_loop().run_in_executor(None, service.start)
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.stop)

    app = FastAPI(title="MiniGPTMedSlicer backend", version=__version__, lifespan=lifespan,
                  description="Image in, findings text and boxes (pixels of the sent image) out. "
                              "All patient-space geometry stays in Slicer.")
    app.state.service = service
    app.state.settings = settings

    # -- errors in one shape ----------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
        return error_response(ApiError("invalid_schema", "; ".join(parts) or "request does not match the schema"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "bad_request", 413: "too_large"}.get(exc.status_code, "bad_request")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code)

    # -- middleware: access token, body limit, request log ----------------------------------
    @app.middleware("http")
    async def _guard(request: Request, call_next):
        rid = next(_request_ids)
        t0 = time.perf_counter()
        request.state.rid = rid
        request.state.log = {}
        outcome_status = 500
        try:
            if settings.token and request.url.path != "/health":
                header = request.headers.get("authorization", "")
                scheme, _, given = header.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
                    resp = error_response(ApiError("unauthorized", "missing or wrong access token: send "
                                                   "'Authorization: Bearer <token>'"))
                    outcome_status = resp.status_code
                    return resp
            length = request.headers.get("content-length")
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    n = -1
                if n < 0:
                    resp = error_response(ApiError("bad_request", "invalid Content-Length"))
                    outcome_status = resp.status_code
                    return resp
                if n > settings.max_body_bytes:
                    resp = error_response(ApiError("too_large", f"request body is {n:,} bytes; the limit is "
                                                   f"{settings.max_body_bytes:,}"))
                    outcome_status = resp.status_code
                    return resp
            elif request.method in ("POST", "PUT"):
                body = b""
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > settings.max_body_bytes:
                        resp = error_response(ApiError("too_large", f"request body exceeds {settings.max_body_bytes:,} bytes"))
                        outcome_status = resp.status_code
                        return resp
                request._body = body  # starlette reuses it for the route
            response = await call_next(request)
            outcome_status = response.status_code
            return response
        finally:
            extra = " ".join(f"{k}={v}" for k, v in request.state.log.items())
            log.info("request id=%d method=%s path=%s status=%d ms=%.1f %s", rid, request.method, request.url.path,
                     outcome_status, (time.perf_counter() - t0) * 1000, extra)

    # -- routes -----------------------------------------------------------------------------
    @app.get("/health", response_model=Health, responses=_ERROR_RESPONSES, tags=["service"])
    async def health() -> dict:
        return service.health()

    @app.post("/v1/analyze", response_model=AnalyzeResponse, responses=_ERROR_RESPONSES, tags=["analyze"])
    async def analyze(body: AnalyzeRequest, request: Request) -> AnalyzeResponse:
        t0 = time.perf_counter()
        inp = await asyncio.get_running_loop().run_in_executor(None, service.prepare, body)
        t1 = time.perf_counter()
        request.state.log.update(task=inp.task, engine=service.info.engine, w=inp.image.width, h=inp.image.height)
        (result,) = await service.run([inp], request.is_disconnected)
        t2 = time.perf_counter()
        resp = service.respond(inp, result, {"decode": (t1 - t0) * 1000, "engine": (t2 - t1) * 1000})
        request.state.log.update(findings=len(resp.findings), engine_ms=f"{(t2 - t1) * 1000:.1f}")
        return resp

    @app.post("/v1/analyze/batch", response_model=BatchResponse, responses=_ERROR_RESPONSES, tags=["analyze"])
    async def analyze_batch(body: BatchRequest, request: Request) -> BatchResponse:
        if not body.items:
            raise ApiError("bad_request", "items is empty")
        if len(body.items) > settings.max_batch_items:
            raise ApiError("too_large", f"{len(body.items)} items; the limit is {settings.max_batch_items} per batch")
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        inputs = await loop.run_in_executor(
            None, lambda: [service.prepare(it, f"items[{i}]") for i, it in enumerate(body.items)])
        t1 = time.perf_counter()
        request.state.log.update(task=",".join(sorted({i.task for i in inputs})), items=len(inputs),
                                 engine=service.info.engine)
        results = await service.run(inputs, request.is_disconnected)
        t2 = time.perf_counter()
        per = {"decode": (t1 - t0) * 1000 / len(inputs), "engine": (t2 - t1) * 1000 / len(inputs)}
        out = [service.respond(i, r, per) for i, r in zip(inputs, results, strict=True)]
        return BatchResponse(results=out, timings_ms={"decode": (t1 - t0) * 1000, "engine": (t2 - t1) * 1000})

    if extra_routes is not None:
        extra_routes(app, service)
    return app


def dumps_error(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}})
