"""The service logic between HTTP and an engine: validation, decoding, one engine worker with a bounded
queue, time limits, cancellation, and sanitising of model output. No FastAPI in here."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from MiniGPTMedSlicerLib.protocol import (
    BOX_TASKS,
    VQA,
    AnalyzeRequest,
    AnalyzeResponse,
    Finding,
    Health,
    ImageUpload,
    SliceValues,
    StoredImage,
    missing_input,
    task_spec,
)

from . import __version__, families
from .batching import Pending, plan_call, waiting_rows
from .engines.base import (
    AnalysisInput,
    AnalysisResult,
    DecodedImage,
    Engine,
    EngineCancelled,
    EngineError,
    EngineInfo,
    ScalarValues,
    StopToken,
    TaskNotSupported,
    Turn,
)
from .errors import ApiError
from .findings import MAX_TEXT_CHARS, clean_text, sanitize_findings
from .images import decode_base64, decode_image
from .lru import LRUStore
from .settings import ServerSettings

log = logging.getLogger("minigptmed.service")


@dataclass
class _Job:
    inputs: list[AnalysisInput]
    stop: StopToken
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    waiting: bool = True  # counted against queue_size until its first rows reach the engine
    error: Exception | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)  # DELETE /v1/requests/{id} or disconnect
    request_id: str | None = None


@dataclass
class _Stored:
    """An uploaded image (``POST /v1/images``), decoded and validated once."""

    image: DecodedImage
    values: ScalarValues | None


def image_id(image: DecodedImage, values: ScalarValues | None) -> str:
    """The id of an image and its values: a SHA-256 of the decoded pixels (and the values with their unit), so the
    same slice uploaded twice gets the same id and the engines' per-image caches hit."""
    if values is None:
        return image.content_id()
    import hashlib

    h = hashlib.sha256(image.content_id().encode())
    h.update(f"{values.unit}{values.volume_min}{values.volume_max}".encode())
    h.update(np.ascontiguousarray(values.array).tobytes())
    return h.hexdigest()


class _AllStopped(StopToken):
    """The stop token of an engine call that serves several requests: it stops only when all of them stopped (one
    client going away or timing out does not cut the others' rows; its own answer is dropped)."""

    def __init__(self, tokens: list[StopToken]):
        deadlines = [t.deadline for t in tokens]
        super().__init__(deadline=None if None in deadlines else max(d for d in deadlines if d is not None))
        self.tokens = tokens

    def should_stop(self) -> bool:
        return all(t.should_stop() for t in self.tokens)


class AnalysisService:
    """Owns the engine. Exactly one worker thread runs the engine; requests wait in a bounded queue, and the ones
    that wait together are batched into one engine call (``backend.batching`` has the policy)."""

    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self._info: EngineInfo | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue()  # bounded by self._waiting <= queue_size
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.calls: list[int] = []  # rows per engine call, most recent last (bounded; for tests and logs)
        self.images: LRUStore[_Stored] = LRUStore(settings.image_store_entries, settings.image_store_bytes)
        self._running: dict[str, _Job] = {}  # request id -> job, until it is answered
        self._running_lock = threading.Lock()
        self.engine_busy = False  # an engine call is running (Cancel-to-idle is measured on this)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Load the engine and start the worker; a second call does nothing (the CLI loads before uvicorn starts)."""
        if self._worker is not None:
            return
        t0 = time.perf_counter()
        self.engine.load()
        self._info = self.engine.info()
        log.info(
            "engine ready: engine=%s model=%s device=%s load_s=%.2f",
            self._info.engine,
            self._info.model,
            self._info.device,
            time.perf_counter() - t0,
        )
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=10)
        self.engine.close()

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise ApiError("not_ready", "the engine is still loading")
        return self._info

    def health(self) -> Health:
        info = self.info
        return Health(
            status="ok",
            engine=info.engine,
            model=info.model,
            device=info.device,
            tasks=list(info.tasks),
            version=__version__,
            max_batch=info.max_batch,
        )

    # -- validation ---------------------------------------------------------------------------

    def prepare(self, req: AnalyzeRequest, where: str = "") -> AnalysisInput:
        """Turn a wire request into an engine input, or raise ApiError (4xx) naming the problem."""
        p = f"{where}." if where else ""
        s = self.settings
        info = self.info
        question = (req.question or "").strip() or None
        missing = missing_input(req.task, question, req.region)
        if missing == "question" and not req.prompt:
            raise ApiError(
                "bad_request", f"{p}question is required for task '{req.task}': give {task_spec(req.task).question}"
            )
        if req.task not in info.tasks:
            raise ApiError("not_supported", _unsupported_message(req.task, info))
        if question is not None and len(question) > s.max_question_chars:
            raise ApiError(
                "bad_request", f"{p}question is {len(question)} characters; the limit is {s.max_question_chars}"
            )
        if req.prompt is not None and len(req.prompt) > s.max_prompt_chars:
            raise ApiError(
                "bad_request", f"{p}prompt is {len(req.prompt)} characters; the limit is {s.max_prompt_chars}"
            )
        if req.max_new_tokens is not None and not (1 <= req.max_new_tokens <= s.max_new_tokens_cap):
            raise ApiError("bad_request", f"{p}max_new_tokens must be between 1 and {s.max_new_tokens_cap}")
        if req.temperature is not None and not (0.0 <= req.temperature <= 2.0 and math.isfinite(req.temperature)):
            raise ApiError("bad_request", f"{p}temperature must be between 0 and 2 (0 = greedy)")
        spacing = None
        if req.pixel_spacing_mm is not None:
            sp = req.pixel_spacing_mm
            if len(sp) != 2 or not all(math.isfinite(v) and 0 < v < 1000 for v in sp):
                raise ApiError(
                    "bad_request", f"{p}pixel_spacing_mm must be [row, col], two positive numbers of millimetres"
                )
            spacing = (float(sp[0]), float(sp[1]))
        modality = None
        if req.modality is not None:
            modality = req.modality.strip().upper()[:16] or None
        history = self._history(req, p)
        image, values, key = self._image(req, p)
        region = None
        if req.region is not None or missing == "region":
            if req.region is None:
                raise ApiError("bad_request", f"{p}region [x0, y0, x1, y1] (pixels) is required for task '{req.task}'")
            r = req.region
            if len(r) != 4 or not all(math.isfinite(v) for v in r):
                raise ApiError("bad_request", f"{p}region must be [x0, y0, x1, y1] in pixels")
            x0, y0, x1, y1 = r
            if not (x0 < x1 and y0 < y1):
                raise ApiError("bad_request", f"{p}region must have x0 < x1 and y0 < y1")
            if x1 <= 0 or y1 <= 0 or x0 >= image.width or y0 >= image.height:
                raise ApiError(
                    "bad_request", f"{p}region {list(r)} lies outside the {image.width}x{image.height} image"
                )
            region = (max(0.0, x0), max(0.0, y0), min(float(image.width), x1), min(float(image.height), y1))
        return AnalysisInput(
            task=req.task,
            image=image,
            question=question,
            region=region,
            pixel_spacing_mm=spacing,
            modality=modality,
            max_new_tokens=req.max_new_tokens or None,
            temperature=req.temperature,
            prompt=req.prompt,
            values=values,
            history=history,
            image_id=key,
        )

    def _image(self, req: AnalyzeRequest, p: str) -> tuple[DecodedImage, ScalarValues | None, str | None]:
        """The request's image and values: sent inline, or stored under ``image_id`` (404 unknown, 410 evicted)."""
        if req.image is not None and req.image_id is not None:
            raise ApiError("bad_request", f"{p}give either image or image_id, not both")
        if req.image_id is None:
            if req.image is None:
                raise ApiError(
                    "bad_request", f"{p}image (base64 PNG/JPEG) or image_id (from POST /v1/images) is required"
                )
            image, values = self.decode_upload(req.image, req.values, p)
            # the engines' per-image caches key on it: with values, the same shown pixels are another model image
            return image, values, (image_id(image, values) if values is not None else None)
        if req.values is not None:
            raise ApiError("bad_request", f"{p}values belong to the image upload (POST /v1/images), not to image_id")
        stored = self.images.get(req.image_id)
        if stored is None:
            if self.images.state(req.image_id) == "evicted":
                raise ApiError(
                    "image_expired",
                    f"{p}image_id {req.image_id[:16]}... was evicted from the image store: upload it again",
                )
            raise ApiError("image_not_found", f"{p}no image is stored under image_id {req.image_id[:16]}...: upload it")
        return stored.image, stored.values, req.image_id

    def _history(self, req: AnalyzeRequest, p: str) -> tuple[Turn, ...]:
        turns = req.history or []
        s = self.settings
        if len(turns) > s.max_history_turns:
            raise ApiError(
                "bad_request",
                f"{p}history has {len(turns)} turns; the limit is {s.max_history_turns}: start a new conversation",
            )
        chars = sum(len(t.question) + len(t.answer) for t in turns)
        if chars > s.max_history_chars:
            raise ApiError(
                "too_large",
                f"{p}history is {chars} characters; the limit is {s.max_history_chars}: start a new conversation",
            )
        return tuple(Turn(t.task or VQA.id, t.question, t.answer) for t in turns)

    def decode_upload(
        self, image_b64: str, values: SliceValues | None, p: str = ""
    ) -> tuple[DecodedImage, ScalarValues | None]:
        """The image and its values, validated as /v1/analyze validates them."""
        image = decode_image(decode_base64(image_b64, f"{p}image"), self.settings.image_limits)
        return image, (self._values(values, image, p) if values is not None else None)

    def store_image(self, upload: ImageUpload) -> StoredImage:
        """``POST /v1/images``: validate, decode and keep the image (LRU) under its content id."""
        image, values = self.decode_upload(upload.image, upload.values)
        key = image_id(image, values)
        nbytes = image.array.nbytes + (values.array.nbytes if values is not None else 0)
        if not self.images.put(key, _Stored(image, values), nbytes):
            raise ApiError(
                "too_large", f"the decoded image is {nbytes:,} bytes; the image store holds {self.images.max_bytes:,}"
            )
        return StoredImage(image_id=key, width=image.width, height=image.height)

    def _values(self, v: SliceValues, image, p: str) -> ScalarValues:
        """``values``: a 16-bit gray PNG of the image's size, finite nonzero slope, finite intercept and range."""
        if not (isinstance(v.slope, (int, float)) and math.isfinite(v.slope) and v.slope != 0):
            raise ApiError("bad_request", f"{p}values.slope must be a finite, nonzero number; got {v.slope}")
        for name in ("intercept", "volume_min", "volume_max"):
            x = getattr(v, name)
            if x is not None and not math.isfinite(x):
                raise ApiError("bad_request", f"{p}values.{name} must be a finite number; got {x}")
        if v.unit not in ("HU", "raw"):
            raise ApiError("bad_request", f"{p}values.unit must be 'HU' or 'raw'; got {v.unit!r}")
        decoded = decode_image(decode_base64(v.data, f"{p}values.data"), self.settings.image_limits)
        a = decoded.array
        if decoded.format != "PNG" or a.ndim != 2 or a.dtype != np.uint16:
            kind = "RGB" if a.ndim == 3 else f"{a.dtype.itemsize * 8}-bit gray"
            raise ApiError(
                "bad_image", f"{p}values.data must be a 16-bit grayscale PNG (lossless); got a {kind} {decoded.format}"
            )
        if a.shape != image.array.shape[:2]:
            raise ApiError(
                "bad_image",
                f"{p}values.data is {a.shape[1]}x{a.shape[0]} pixels but image is {image.width}x{image.height}: "
                "the values must be resliced with exactly the image's geometry",
            )
        arr = (a.astype(np.float32) * np.float32(v.slope) + np.float32(v.intercept)).astype(np.float32)
        return ScalarValues(array=arr, unit=v.unit, volume_min=v.volume_min, volume_max=v.volume_max)

    # -- running ------------------------------------------------------------------------------

    async def run(
        self, inputs: Sequence[AnalysisInput], is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> list[AnalysisResult]:
        """Queue the inputs for the engine and wait. 503 when the queue is full, 504 past the time limit."""
        return await self.wait(self.submit(inputs), is_disconnected)

    def submit(self, inputs: Sequence[AnalysisInput], request_id: str | None = None) -> _Job:
        """Queue the inputs (503 when the queue is full); ``request_id`` makes the job cancellable by
        :meth:`cancel`. Call from the event loop; then :meth:`wait` (or watch ``job.future``)."""
        loop = asyncio.get_running_loop()
        stop = StopToken(deadline=time.monotonic() + self.settings.request_timeout_s)
        job = _Job(list(inputs), stop, loop, loop.create_future(), request_id=request_id)
        for inp in job.inputs:
            inp.cancelled = job.cancelled
        with self._waiting_lock:
            if self._waiting >= max(1, self.settings.queue_size):
                raise ApiError(
                    "busy",
                    f"the server is busy: {self._waiting} requests are waiting; retry shortly",
                    headers={"Retry-After": "2"},
                )
            self._waiting += 1
        if request_id is not None:
            with self._running_lock:
                self._running[request_id] = job
        self._queue.put(job)
        return job

    async def wait(
        self, job: _Job, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> list[AnalysisResult]:
        """The job's results; 504 past the time limit; a client that went away cancels it."""
        try:
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=0.05)
                if done:
                    return job.future.result()
                if self.timed_out(job):
                    raise self.timeout_error()
                if is_disconnected is not None and await is_disconnected():
                    self.cancel_job(job)
                    raise ApiError("cancelled", "client disconnected")
        except asyncio.CancelledError:
            self.cancel_job(job)
            raise
        finally:
            self.forget(job)

    def timed_out(self, job: _Job) -> bool:
        if job.stop.should_stop() and not job.cancelled.is_set():
            job.stop.event.set()
            return True
        return False

    def timeout_error(self) -> ApiError:
        return ApiError(
            "timeout", f"the analysis took longer than {self.settings.request_timeout_s:g} s and was stopped"
        )

    def cancel_job(self, job: _Job) -> None:
        """Stop a job: its rows leave the engine's batch at the next decode step (the other requests' rows go on);
        a call that serves only it stops at once."""
        job.cancelled.set()
        job.stop.event.set()

    def cancel(self, request_id: str) -> bool:
        """``DELETE /v1/requests/{id}``: True when a running request was cancelled."""
        with self._running_lock:
            job = self._running.get(request_id)
        if job is None or job.future.done():
            return False
        self.cancel_job(job)
        return True

    def forget(self, job: _Job) -> None:
        """The waiter is done with ``job`` (answered, timed out, or its client left)."""
        if not job.future.done():  # nobody reads its outcome now: asyncio must not log it as never retrieved
            job.future.add_done_callback(_read_outcome)
        if job.request_id is not None:
            with self._running_lock:
                self._running.pop(job.request_id, None)

    def _unwait(self, job: _Job) -> None:
        if job.waiting:
            job.waiting = False
            with self._waiting_lock:
                self._waiting -= 1

    def _take(self, pending: list[Pending], job: _Job) -> None:
        pending.append(Pending(job, len(job.inputs)))

    def _work(self) -> None:
        """Serve the queue: gather what waits (up to the engine's max_batch rows), one engine call, answer the
        requests whose rows are all done, repeat. See ``backend.batching`` for the order rows are taken in."""
        pending: list[Pending] = []
        cap = max(1, self.info.max_batch)
        while True:
            if not pending:  # idle: wait for a request, then a short window for others sent at the same time
                job = self._queue.get()
                if job is None:
                    return
                self._take(pending, job)
                t_end = time.monotonic() + max(0.0, self.settings.batch_window_s)
                while waiting_rows(pending) < cap and (left := t_end - time.monotonic()) > 0:
                    try:
                        job = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                    if job is None:
                        return
                    self._take(pending, job)
            while True:  # everything that arrived while the engine was busy
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    return
                self._take(pending, job)
            for p in list(pending):
                if p.job.stop.should_stop():  # cancelled or expired while waiting
                    pending.remove(p)
                    self._unwait(p.job)
                    self._resolve(
                        p.job, exc=_cancelled(p.job) or ApiError("timeout", "the request expired in the queue")
                    )
            call = plan_call(pending, cap)
            if not call:
                continue
            in_call = list(dict.fromkeys(p for p, _ in call))
            for p in in_call:
                self._unwait(p.job)
            for p, i in call:
                p.next_row = max(p.next_row, i + 1)
            self.engine_busy = True
            try:
                self._call(call)
            finally:
                self.engine_busy = False
            for p in in_call:
                if p.job.cancelled.is_set():
                    pending.remove(p)
                    self._resolve(p.job, exc=_cancelled(p.job))
                elif p.job.error is not None:
                    pending.remove(p)
                    self._resolve(p.job, exc=p.job.error)
                elif p.left == 0:
                    pending.remove(p)
                    self._resolve(p.job, value=p.results)

    def _call(self, call: list[tuple[Pending, int]]) -> None:
        """One engine call; results land in each request's ``results``, a failure in its job's ``error``. When a call
        that mixes requests fails, each request's rows are run again on their own, so that one bad request does not
        fail the others."""
        jobs = list(dict.fromkeys(p for p, _ in call))
        stop = jobs[0].job.stop if len(jobs) == 1 else _AllStopped([p.job.stop for p in jobs])
        self.calls = [*self.calls[-999:], len(call)]
        try:
            results = self.engine.analyze_batch([p.job.inputs[i] for p, i in call], stop)
            if len(results) != len(call):
                raise EngineError(f"engine returned {len(results)} results for {len(call)} inputs")
            for (p, i), r in zip(call, results, strict=True):
                p.results[i] = r
        except Exception as e:
            if len(jobs) > 1:
                for p in jobs:
                    self._call([(q, i) for q, i in call if q is p])
                return
            jobs[0].job.error = _api_error(e)

    @staticmethod
    def _resolve(job: _Job, value=None, exc: Exception | None = None) -> None:
        def _set() -> None:
            if job.future.done():
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(value)

        try:
            job.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # loop closed (server shutting down)
            pass

    # -- output -------------------------------------------------------------------------------

    def respond(self, inp: AnalysisInput, result: AnalysisResult, timings: dict[str, float]) -> AnalyzeResponse:
        info = self.info
        findings, warnings = sanitize_findings(list(result.findings), inp.image.width, inp.image.height)
        return AnalyzeResponse(
            task=inp.task,
            engine=info.engine,
            model=info.model,
            text=clean_text(result.text, MAX_TEXT_CHARS),
            findings=[Finding(f.label, f.box, f.score) for f in findings],
            raw_output=clean_text(result.raw_output, MAX_TEXT_CHARS),
            timings_ms={**{k: round(float(v), 3) for k, v in result.timings_ms.items()}, **timings},
            warnings=[clean_text(w, 500) for w in list(result.warnings) + warnings],
        )


def _read_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _cancelled(job: _Job) -> ApiError | None:
    if not job.cancelled.is_set():
        return None
    return ApiError("cancelled", "the request was cancelled")


def _api_error(e: Exception) -> ApiError:
    """What the client is told when the engine call for its request failed."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, TaskNotSupported):
        return ApiError("not_supported", str(e))
    if isinstance(e, EngineCancelled):
        return ApiError("timeout", str(e))
    if isinstance(e, EngineError):
        return ApiError("engine_error", f"the engine failed: {e}", headers={"Retry-After": "1"})
    # out of memory and engine bugs: report, free, keep serving
    oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
    _free_accelerator_memory()
    if oom:
        msg = "the engine ran out of memory on this request; try a smaller image or batch"
    else:
        msg = f"the engine failed ({type(e).__name__})"
        log.error("engine failure: %s", "".join(traceback.format_exception_only(type(e), e)).strip())
    return ApiError("engine_error", msg, headers={"Retry-After": "1"})


def _unsupported_message(task: str, info: EngineInfo) -> str:
    msg = f"task '{task}' is not supported by the {info.engine} engine ({info.model}); it supports: {', '.join(info.tasks)}"
    if task == VQA.id and info.engine == "builtin":
        msg += (
            ". Free-text questions need a vision-language model: start the backend with --engine minigptmed, "
            "--engine hf (MedGemma, Qwen-VL) or --engine openai (a vLLM/Ollama server)"
        )
    if info.engine in ("hf", "openai") and task in BOX_TASKS:
        msg += f". Boxes need a model family with a box format: --family {families.box_families_text()}"
    return msg


def _free_accelerator_memory() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "cuda", None) is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
