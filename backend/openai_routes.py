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

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from MiniGPTMedSlicerLib.protocol import ERRORS, REPORT, TASKS, VQA, AnalyzeRequest, Finding, Task, status_descriptions
from pydantic import BaseModel, ConfigDict, Field

from .box_codecs import pixels_to_norm1000
from .errors import ApiError
from .service import AnalysisService

#: The routes that answer in OpenAI's shapes (errors included).
OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")
_TAG = re.compile(r"^\s*\[(" + "|".join(map(re.escape, TASKS)) + r")\]\s*", re.I)


# -- request ----------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    """OpenAI clients send many fields this server does not use (``top_p``, ``seed``, ``tools``...): they are ignored
    (``n`` other than 1 is refused)."""

    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str


class ContentPart(_Lenient):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    task: Task | None = Field(default=None, description="an extension: the task (else a leading [task] tag)")
    region: list[float] | None = Field(default=None, description="an extension: [x0, y0, x1, y1] pixels (identify)")
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    n: int | None = Field(default=None, description="choices per request: only 1 (more are refused)")
    stream: bool = False


# -- responses --------------------------------------------------------------------------------------


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    findings: list[Finding] = Field(default_factory=list, description="an extension: the boxes in pixels")


class Choice(BaseModel):
    index: int = 0
    finish_reason: str = "stop"
    message: AssistantMessage


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage = Field(default_factory=Usage)


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None
    findings: list[Finding] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIError(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


def openai_error_body(err: ApiError) -> dict[str, Any]:
    """An ApiError in OpenAI's shape: ``{"error": {"message", "type", "code", "param"}}``."""
    known = ERRORS.get(err.code)
    kind = known.openai_type if known else ("invalid_request_error" if err.status < 500 else "server_error")
    return OpenAIErrorBody(error=OpenAIError(message=err.message, type=kind, code=err.code)).model_dump()


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": OpenAIErrorBody, "description": f"{desc} (OpenAI's error shape)"}
        for status, desc in status_descriptions(statuses).items()
    }


# -- parsing ----------------------------------------------------------------------------------------


def parse_chat_request(body: ChatCompletionRequest, engine_tasks: tuple[str, ...]) -> AnalyzeRequest:
    """OpenAI chat request -> our AnalyzeRequest (raises ApiError with a clear message)."""
    if body.n is not None and body.n != 1:
        raise ApiError("bad_request", f"n={body.n}: this server answers one choice per request; send n=1 (or omit it)")
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise ApiError("bad_request", "no user message")
    content = users[-1].content
    texts: list[str] = []
    image = None
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if part.type == "text" and part.text is not None:
                texts.append(part.text)
            elif part.type == "image_url" and image is None and part.image_url is not None:
                image = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
    else:
        raise ApiError("invalid_schema", "message content must be a string or a list of parts")
    if image is None:
        raise ApiError("bad_request", "the user message needs an image part (image_url with a data: URI)")
    if not image.startswith("data:"):
        raise ApiError("bad_request", "only data: URIs are accepted for images (this server fetches no URLs)")
    text = " ".join(t.strip() for t in texts if t.strip())
    task: str | None = body.task
    m = _TAG.match(text)
    if m:
        task = task or m.group(1).lower()
        text = text[m.end() :]
    if task is None:
        task = VQA.id if (VQA.id in engine_tasks and text) else REPORT.id
    return AnalyzeRequest(
        task=task,
        image=image,
        question=text or None,
        region=body.region,
        max_new_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
    )


# -- routes -----------------------------------------------------------------------------------------


def add_openai_routes(app: FastAPI, service: AnalysisService) -> None:
    @app.get("/v1/models", tags=["openai"], response_model=ModelList, responses=_responses(401, 503))
    async def models() -> ModelList:
        info = service.info
        return ModelList(data=[ModelCard(id=info.model, owned_by=f"minigptmed-backend ({info.engine})")])

    async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | StreamingResponse:
        req = parse_chat_request(body, service.info.tasks)
        inp = await asyncio.get_running_loop().run_in_executor(None, service.prepare, req)
        t0 = time.perf_counter()
        (result,) = await service.run([inp], request.is_disconnected)
        resp = service.respond(inp, result, {"engine": (time.perf_counter() - t0) * 1000})
        request.scope.setdefault("state", {}).setdefault("log", {}).update(task=req.task, engine=service.info.engine)
        content = resp.text
        if resp.findings:
            w, h = inp.image.width, inp.image.height
            boxes = [
                {"bbox_2d": [round(v) for v in pixels_to_norm1000(f.box, w, h)], "label": f.label, "score": f.score}
                for f in resp.findings
            ]
            content += "\n```json\n" + json.dumps(boxes) + "\n```"
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:  # the whole answer in one chunk (the engines do not stream tokens)
            return StreamingResponse(
                _sse(cid, created, resp.model, content, resp.findings),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        message = AssistantMessage(content=content, findings=resp.findings)
        return ChatCompletion(id=cid, created=created, model=resp.model, choices=[Choice(message=message)])

    app.router.add_api_route(
        "/v1/chat/completions",
        chat_completions,
        methods=["POST"],
        tags=["openai"],
        response_model=ChatCompletion,
        responses=_responses(400, 401, 413, 422, 501, 503, 504),
        strict_content_type=False,  # as before: a JSON body without a Content-Type header is read as JSON
    )


def _sse(cid: str, created: int, model: str, content: str, findings: list[Finding]) -> Iterator[str]:
    """``stream: true``: OpenAI's chunk events (role, the content, the finish) and ``data: [DONE]``."""
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    for delta, finish in (
        (Delta(role="assistant", content=""), None),
        (Delta(content=content, findings=findings), None),
        (Delta(), "stop"),
    ):
        choice = {"index": 0, "delta": delta.model_dump(exclude_none=True), "finish_reason": finish}
        yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
    yield "data: [DONE]\n\n"
