"""An OpenAI-compatible face for any engine: ``GET /v1/models`` and ``POST /v1/chat/completions``.

OpenAI clients and tools can talk to MiniGPT-Med (or any engine) through it: the last user message's image part
(a ``data:`` URI) is the image, its text parts are the question. Requests go through the same service as
``/v1/analyze`` (validation, access token, limits, queue, time limit, output sanitising).

Choosing the task (an extension; plain clients need nothing): a top-level ``"task"`` field
(``report | vqa | detect | ground | identify``) or a leading ``[task]`` tag in the text, e.g. ``[detect] nodule``.
Without either, the engine's free-text task is used: ``vqa`` when it has one and a question was given, else ``report``.
When the answer has boxes, the message content ends with a fenced JSON list in Qwen3-VL's convention
(``bbox_2d`` = [x0, y0, x1, y1] on 0..1000 of the image, plus ``label`` and ``score``), and the message carries them
in pixels as an extra ``findings`` field. ``"stream": true`` is answered as server-sent events (OpenAI's
``chat.completion.chunk`` objects, then ``data: [DONE]``) carrying the whole answer in one content chunk.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from MiniGPTMedSlicerLib.protocol import TASKS, AnalyzeRequest

from .errors import ApiError
from .service import AnalysisService

_TAG = re.compile(r"^\s*\[(report|vqa|detect|ground|identify)\]\s*", re.I)


def _openai_error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code, "param": None}},
        status_code=status,
        headers=headers or {},
    )


def parse_chat_request(body: Any, engine_tasks: tuple[str, ...]) -> AnalyzeRequest:
    """OpenAI chat body -> our AnalyzeRequest (raises ApiError with a clear message)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise ApiError("invalid_schema", "messages must be a non-empty list")
    users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ApiError("bad_request", "no user message")
    content = users[-1].get("content")
    texts: list[str] = []
    image = None
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "image_url" and image is None:
                iu = part.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                if isinstance(url, str):
                    image = url
    else:
        raise ApiError("invalid_schema", "message content must be a string or a list of parts")
    if image is None:
        raise ApiError("bad_request", "the user message needs an image part (image_url with a data: URI)")
    if not image.startswith("data:"):
        raise ApiError("bad_request", "only data: URIs are accepted for images (this server fetches no URLs)")
    text = " ".join(t.strip() for t in texts if t.strip())
    task = body.get("task")
    m = _TAG.match(text)
    if m:
        task = task or m.group(1).lower()
        text = text[m.end() :]
    if task is not None and task not in TASKS:
        raise ApiError("bad_request", f"task must be one of {', '.join(TASKS)}")
    if task is None:
        task = "vqa" if ("vqa" in engine_tasks and text) else "report"
    region = body.get("region")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    temperature = body.get("temperature")
    try:
        return AnalyzeRequest(
            task=task,  # type: ignore[arg-type]
            image=image,
            question=text or None,
            region=[float(v) for v in region] if isinstance(region, list) else None,
            max_new_tokens=int(max_tokens) if max_tokens is not None else None,
            temperature=float(temperature) if temperature is not None else None,
        )
    except (TypeError, ValueError):
        raise ApiError("invalid_schema", "max_tokens, temperature and region must be numbers") from None


_OPENAI_ERRORS: dict[int | str, dict] = {
    code: {"description": f"{desc} (OpenAI error shape: {{'error': {{'message', 'type', 'code'}}}})"}
    for code, desc in [
        (400, "bad image or field"),
        (401, "missing or wrong access token"),
        (413, "too large"),
        (422, "does not match the schema"),
        (501, "task not supported by this engine"),
        (503, "engine busy or failed"),
        (504, "time limit reached"),
    ]
}


def add_openai_routes(app: FastAPI, service: AnalysisService) -> None:
    @app.get("/v1/models", tags=["openai"], responses={401: _OPENAI_ERRORS[401]})
    async def models() -> dict:
        info = service.info
        return {
            "object": "list",
            "data": [
                {"id": info.model, "object": "model", "created": 0, "owned_by": f"minigptmed-backend ({info.engine})"}
            ],
        }

    @app.post("/v1/chat/completions", tags=["openai"], responses=_OPENAI_ERRORS)
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _openai_error(400, "the body is not JSON", "invalid_json")
        try:
            req = parse_chat_request(body, service.info.tasks)
            import asyncio

            inp = await asyncio.get_running_loop().run_in_executor(None, service.prepare, req)
            t0 = time.perf_counter()
            (result,) = await service.run([inp], request.is_disconnected)
            resp = service.respond(inp, result, {"engine": (time.perf_counter() - t0) * 1000})
        except ApiError as e:
            return _openai_error(e.status, e.message, e.code, e.headers)
        request.scope.setdefault("state", {}).setdefault("log", {}).update(task=req.task, engine=service.info.engine)
        content = resp.text
        if resp.findings:
            w, h = inp.image.width, inp.image.height
            boxes = [
                {
                    "bbox_2d": [
                        round(f.box[0] / w * 1000),
                        round(f.box[1] / h * 1000),
                        round(f.box[2] / w * 1000),
                        round(f.box[3] / h * 1000),
                    ],
                    "label": f.label,
                    "score": f.score,
                }
                for f in resp.findings
            ]
            content += "\n```json\n" + json.dumps(boxes) + "\n```"
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        findings = [{"label": f.label, "box": f.box, "score": f.score} for f in resp.findings]
        if body.get("stream") is True:  # the whole answer in one chunk (the engines do not stream tokens)
            return StreamingResponse(
                _sse(cid, created, resp.model, content, findings),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": resp.model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": content, "findings": findings},
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }


def _sse(cid: str, created: int, model: str, content: str, findings: list):
    """``stream: true``: OpenAI's chunk events (role, the content, the finish) and ``data: [DONE]``."""
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    for delta, finish in (
        ({"role": "assistant", "content": ""}, None),
        ({"content": content, "findings": findings}, None),
        ({}, "stop"),
    ):
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"
