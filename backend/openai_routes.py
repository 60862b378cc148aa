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
``chat.completion.chunk`` objects, then ``data: [DONE]``): one content chunk per piece the engine decodes (MiniGPT-Med
streams token by token; engines that do not stream send one chunk), then the boxes with ``usage``.
Multi-turn ``messages``: one image in the conversation; the earlier user/assistant pairs are the request's history.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from MiniGPTMedSlicerLib.protocol import (
    ERRORS,
    REPORT,
    TASKS,
    VQA,
    AnalyzeRequest,
    Finding,
    HistoryTurn,
    Task,
    status_descriptions,
)
from pydantic import BaseModel, ConfigDict, Field

from .box_codecs import pixels_to_norm1000
from .errors import ApiError
from .findings import MAX_TEXT_CHARS, clean_text
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


def _parts(m: ChatMessage) -> tuple[str, list[str]]:
    """(the message's text, its image URLs)."""
    content = m.content
    if content is None:
        return "", []
    if isinstance(content, str):
        return content.strip(), []
    if not isinstance(content, list):
        raise ApiError("invalid_schema", "message content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        if part.type == "text" and part.text is not None:
            texts.append(part.text)
        elif part.type == "image_url" and part.image_url is not None:
            images.append(part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url)
    return " ".join(t.strip() for t in texts if t.strip()), images


def _task_of(text: str, given: str | None, engine_tasks: tuple[str, ...]) -> tuple[str, str]:
    m = _TAG.match(text)
    task = given
    if m:
        task = task or m.group(1).lower()
        text = text[m.end() :]
    if task is None:
        task = VQA.id if (VQA.id in engine_tasks and text) else REPORT.id
    return task, text


def parse_chat_request(body: ChatCompletionRequest, engine_tasks: tuple[str, ...]) -> AnalyzeRequest:
    """OpenAI chat request -> our AnalyzeRequest (raises ApiError with a clear message). Multi-turn: one image in
    any user message (usually the first); the last user message is the question; each earlier user message with the
    assistant message after it is a turn of ``history``."""
    if body.n is not None and body.n != 1:
        raise ApiError("bad_request", f"n={body.n}: this server answers one choice per request; send n=1 (or omit it)")
    msgs = [m for m in body.messages if m.role in ("user", "assistant")]
    users = [i for i, m in enumerate(msgs) if m.role == "user"]
    if not users:
        raise ApiError("bad_request", "no user message")
    parsed = [_parts(m) for m in msgs]
    images = [u for _, imgs in parsed for u in imgs]
    if not images:
        raise ApiError("bad_request", "the user message needs an image part (image_url with a data: URI)")
    if len(images) > 1:
        raise ApiError(
            "bad_request", f"{len(images)} images in the conversation; this server takes one per conversation"
        )
    image = images[0]
    if not image.startswith("data:"):
        raise ApiError("bad_request", "only data: URIs are accepted for images (this server fetches no URLs)")
    history: list[HistoryTurn] = []
    last = users[-1]
    for i in users[:-1]:
        answer = parsed[i + 1][0] if i + 1 < len(msgs) and msgs[i + 1].role == "assistant" else ""
        t_task, t_text = _task_of(parsed[i][0], None, engine_tasks)
        history.append(HistoryTurn(question=t_text, answer=answer, task=t_task))  # type: ignore[arg-type]
    task, text = _task_of(parsed[last][0], body.task, engine_tasks)
    return AnalyzeRequest(
        task=task,
        image=image,
        question=text or None,
        region=body.region,
        max_new_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        history=history or None,
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
        request.scope.setdefault("state", {}).setdefault("log", {}).update(task=req.task, engine=service.info.engine)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        rid = request.scope.get("state", {}).get("rid")
        if (
            body.stream
        ):  # real per-token deltas from the engine's decode loop (one chunk for engines that do not stream)
            loop = asyncio.get_running_loop()
            pieces: asyncio.Queue[str] = asyncio.Queue()

            def on_text(text: str) -> None:
                text = clean_text(text, MAX_TEXT_CHARS)  # as the final text is cleaned
                if text:
                    loop.call_soon_threadsafe(pieces.put_nowait, text)

            inp.on_text = on_text
            job = service.submit([inp], rid)
            return StreamingResponse(
                _stream_chunks(service, job, inp, pieces, cid, created),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        t0 = time.perf_counter()
        (result,) = await service.wait(service.submit([inp], rid), request.is_disconnected)
        resp = service.respond(inp, result, {"engine": (time.perf_counter() - t0) * 1000})
        message = AssistantMessage(content=resp.text + _boxes_block(resp.findings, inp), findings=resp.findings)
        return ChatCompletion(
            id=cid, created=created, model=resp.model, choices=[Choice(message=message)], usage=_usage(resp)
        )

    app.router.add_api_route(
        "/v1/chat/completions",
        chat_completions,
        methods=["POST"],
        tags=["openai"],
        response_model=ChatCompletion,
        responses=_responses(400, 401, 413, 422, 501, 503, 504),
        strict_content_type=False,  # as before: a JSON body without a Content-Type header is read as JSON
    )


def _usage(resp) -> Usage:
    p = int(resp.timings_ms.get("prompt_tokens", 0))
    c = int(resp.timings_ms.get("new_tokens", 0))
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _boxes_block(findings: list[Finding], inp) -> str:
    """The boxes as a fenced JSON list in Qwen3-VL's convention (0..1000 of the image), appended to the content."""
    if not findings:
        return ""
    w, h = inp.image.width, inp.image.height
    boxes = [
        {"bbox_2d": [round(v) for v in pixels_to_norm1000(f.box, w, h)], "label": f.label, "score": f.score}
        for f in findings
    ]
    return "\n```json\n" + json.dumps(boxes) + "\n```"


async def _stream_chunks(service: AnalysisService, job, inp, pieces, cid: str, created: int):
    """``stream: true``: OpenAI's chunk events: the role, one content chunk per decoded piece, the boxes (when any)
    with the finish reason and ``usage``, then ``data: [DONE]``; an engine error mid-stream is one
    ``data:`` object in OpenAI's error shape. A client that goes away cancels the request."""
    model = service.info.model
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: Delta, finish: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta.model_dump(exclude_none=True), "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice], **extra})}\n\n"

    finished = False
    sent: list[str] = []
    getter: asyncio.Future | None = None
    try:
        yield chunk(Delta(role="assistant", content=""))
        getter = asyncio.ensure_future(pieces.get())
        while True:
            done, _ = await asyncio.wait({getter, job.future}, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                sent.append(getter.result())
                yield chunk(Delta(content=sent[-1]))
                getter = asyncio.ensure_future(pieces.get())
            elif job.future.done():
                break
            elif service.timed_out(job):
                finished = True
                yield f"data: {json.dumps(openai_error_body(service.timeout_error()))}\n\n"
                return
        getter.cancel()
        while not pieces.empty():
            sent.append(pieces.get_nowait())
            yield chunk(Delta(content=sent[-1]))
        finished = True
        try:
            (result,) = job.future.result()
        except ApiError as e:
            yield f"data: {json.dumps(openai_error_body(e))}\n\n"
            return
        resp = service.respond(inp, result, {})
        final, so_far = resp.raw_output or resp.text, "".join(sent)
        rest = final[len(so_far) :] if final.startswith(so_far) else ""
        if rest:
            yield chunk(Delta(content=rest))
        tail = _boxes_block(resp.findings, inp)
        yield chunk(
            Delta(content=tail or None, findings=resp.findings or None), "stop", usage=_usage(resp).model_dump()
        )
        yield "data: [DONE]\n\n"
    finally:
        if getter is not None:  # a client that went away left it waiting for the next piece
            getter.cancel()
        if not finished:
            service.cancel_job(job)
        service.forget(job)
