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

from MiniGPTMedSlicerLib.protocol import AnalyzeRequest, AnalyzeResponse, Finding

from . import __version__
from .engines.base import (
    AnalysisInput,
    AnalysisResult,
    Engine,
    EngineCancelled,
    EngineError,
    EngineInfo,
    StopToken,
    TaskNotSupported,
)
from .errors import ApiError
from .findings import MAX_TEXT_CHARS, clean_text, sanitize_findings
from .images import decode_base64, decode_image
from .settings import ServerSettings

log = logging.getLogger("minigptmed.service")

TASKS_NEEDING_QUESTION = {"vqa": "a question", "ground": "the phrase to locate"}


@dataclass
class _Job:
    inputs: list[AnalysisInput]
    stop: StopToken
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class AnalysisService:
    """Owns the engine. Exactly one worker thread runs the engine; requests wait in a bounded queue."""

    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self._info: EngineInfo | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max(1, settings.queue_size))
        self._worker: threading.Thread | None = None
        self.busy = False

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
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

    def health(self) -> dict:
        info = self.info
        return {
            "status": "ok",
            "engine": info.engine,
            "model": info.model,
            "device": info.device,
            "tasks": list(info.tasks),
            "version": __version__,
            "api": "v1",
            "max_batch": info.max_batch,
        }

    # -- validation ---------------------------------------------------------------------------

    def prepare(self, req: AnalyzeRequest, where: str = "") -> AnalysisInput:
        """Turn a wire request into an engine input, or raise ApiError (4xx) naming the problem."""
        p = f"{where}." if where else ""
        s = self.settings
        info = self.info
        question = (req.question or "").strip() or None
        if req.task in TASKS_NEEDING_QUESTION and question is None and not req.prompt:
            raise ApiError(
                "bad_request", f"{p}question is required for task '{req.task}': give {TASKS_NEEDING_QUESTION[req.task]}"
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
        image = decode_image(decode_base64(req.image, f"{p}image"), s.image_limits)
        region = None
        if req.region is not None or req.task == "identify":
            if req.region is None:
                raise ApiError("bad_request", f"{p}region [x0, y0, x1, y1] (pixels) is required for task 'identify'")
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
        )

    # -- running ------------------------------------------------------------------------------

    async def run(
        self, inputs: Sequence[AnalysisInput], is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> list[AnalysisResult]:
        """Queue the inputs for the engine and wait. 503 when the queue is full, 504 past the time limit."""
        loop = asyncio.get_running_loop()
        stop = StopToken(deadline=time.monotonic() + self.settings.request_timeout_s)
        job = _Job(list(inputs), stop, loop, loop.create_future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(
                "busy",
                f"the server is busy: {self._queue.qsize()} requests are waiting; retry shortly",
                headers={"Retry-After": "2"},
            ) from None
        try:
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=0.25)
                if done:
                    return job.future.result()
                if stop.should_stop():
                    stop.event.set()
                    raise ApiError(
                        "timeout",
                        f"the analysis took longer than {self.settings.request_timeout_s:g} s and was stopped",
                    )
                if is_disconnected is not None and await is_disconnected():
                    stop.event.set()
                    raise ApiError("bad_request", "client disconnected")
        except asyncio.CancelledError:
            stop.event.set()
            raise

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.stop.should_stop():  # cancelled or expired while waiting
                self._resolve(job, exc=ApiError("timeout", "the request expired in the queue"))
                continue
            self.busy = True
            try:
                results = self.engine.analyze_batch(job.inputs, job.stop)
                if len(results) != len(job.inputs):
                    raise EngineError(f"engine returned {len(results)} results for {len(job.inputs)} inputs")
                self._resolve(job, value=results)
            except TaskNotSupported as e:
                self._resolve(job, exc=ApiError("not_supported", str(e)))
            except EngineCancelled as e:
                self._resolve(job, exc=ApiError("timeout", str(e)))
            except EngineError as e:
                self._resolve(
                    job, exc=ApiError("engine_error", f"the engine failed: {e}", headers={"Retry-After": "1"})
                )
            except Exception as e:  # out of memory and engine bugs: report, free, keep serving
                oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
                _free_accelerator_memory()
                if oom:
                    msg = "the engine ran out of memory on this request; try a smaller image or batch"
                else:
                    msg = f"the engine failed ({type(e).__name__})"
                    log.error("engine failure: %s", "".join(traceback.format_exception_only(type(e), e)).strip())
                self._resolve(job, exc=ApiError("engine_error", msg, headers={"Retry-After": "1"}))
            finally:
                self.busy = False

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


def _unsupported_message(task: str, info: EngineInfo) -> str:
    msg = f"task '{task}' is not supported by the {info.engine} engine ({info.model}); it supports: {', '.join(info.tasks)}"
    if task == "vqa" and info.engine == "builtin":
        msg += (
            ". Free-text questions need a vision-language model: start the backend with --engine minigptmed, "
            "--engine hf (MedGemma, Qwen-VL) or --engine openai (a vLLM/Ollama server)"
        )
    if info.engine in ("hf", "openai") and task in ("detect", "ground", "identify"):
        msg += ". Boxes need a model family with a box format: --family medgemma, qwen2_5_vl or qwen3_vl"
    return msg


def _free_accelerator_memory() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "cuda", None) is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
