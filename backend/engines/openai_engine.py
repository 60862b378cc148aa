"""``--engine openai``: a model served by an OpenAI-compatible server (vLLM, SGLang, Ollama) — scale-out.

Each image goes to ``{url}/chat/completions`` as a base64 ``data:`` URI with the family's prompt; the answer is
decoded with the family's box decoder. Temperature 0 unless the request asks otherwise (vLLM would otherwise apply the
model's own sampling defaults). Batches are sent as concurrent requests (the server batches them itself).

Every request reads the remote server's own stream: ``"stream": true`` (with ``stream_options.include_usage``); for a
streaming request (``AnalysisInput.on_text``) each ``choices[0].delta.content`` of its server-sent events goes out
through ``DeltaText`` as the other engines' tokens do, until ``data: [DONE]``. A cancel (streaming or not: a client
that went away, ``DELETE /v1/requests/{id}``) or the deadline closes the connection at once (``backend.remote_stream``:
a watcher shuts its socket; without one, at the next chunk), and the remote server stops generating. The boxes are decoded from the whole text at the end. An ``error`` object mid-stream
is an engine error; a server that answers with one JSON completion instead of a stream is read as such.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import time
from collections.abc import Sequence

import requests
from MiniGPTMedSlicerLib.protocol import REPORT, TEXT_TASKS

from .. import families
from ..families import ImageGeometry
from ..remote_stream import (
    StreamBroken,
    StreamEventError,
    StreamStopped,
    StreamTimedOut,
    event_object,
    is_event_stream,
    sse_data,
)
from ..setting_error import SettingError
from ..settings import OpenAISettings
from .base import (
    AnalysisInput,
    AnalysisResult,
    Engine,
    EngineCancelled,
    EngineError,
    EngineInfo,
    StopToken,
    model_image,
)
from .text_stream import DeltaText


class _RowCancelled(Exception):
    """This request was cancelled while its answer streamed in (the connection is closed)."""


class OpenAIEngine(Engine):
    def __init__(self, settings: OpenAISettings):
        if not settings.url:
            raise SettingError("the openai engine needs {url}, e.g. http://127.0.0.1:8000/v1", "url")
        self.settings = settings
        self.url = settings.url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.model = settings.model
        self.family = families.check_family(settings.family)
        self.api_key = settings.api_key
        self.timeout_s = settings.timeout_s
        self.max_concurrency = settings.max_concurrency
        self.default_max_tokens = settings.default_max_tokens
        self.session = requests.Session()

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        url = f"{self.url}{path}"
        try:
            r = self.session.request(
                method, url, json=body, headers=self._headers(), timeout=(5.0, timeout or self.timeout_s)
            )
        except requests.exceptions.Timeout:
            raise EngineError(
                f"the model server at {self.url} did not answer within {timeout or self.timeout_s:g} s"
            ) from None
        except requests.exceptions.ConnectionError:
            raise EngineError(f"cannot reach the model server at {self.url}: is it running?") from None
        if r.status_code >= 400:
            detail = r.text[:300].replace("\n", " ")
            raise EngineError(f"the model server at {self.url} answered {r.status_code}: {detail}")
        try:
            data = r.json()
        except ValueError:
            raise EngineError(f"the model server at {self.url} sent a reply that is not JSON") from None
        if not isinstance(data, dict):
            raise EngineError(f"the model server at {self.url} sent an unexpected reply")
        return data

    def load(self) -> None:
        data = self._call("GET", "/models", timeout=10.0)
        ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
        if self.model is None:
            if not ids:
                raise SettingError(f"the model server at {self.url} lists no models; set {{model}}", "model")
            self.model = ids[0]
        elif ids and self.model not in ids:
            raise EngineError(f"the model server at {self.url} serves {', '.join(map(str, ids))}, not {self.model}")

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="openai",
            model=f"{self.model} ({self.family}) at {self.url}",
            device="remote",
            tasks=families.supported_tasks(self.family),
            max_batch=self.max_concurrency,
        )

    def analyze_batch(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        for inp in inputs:
            families.check_task(self.family, inp.task)
        if len(inputs) == 1:
            return [self._one(inputs[0], stop)]
        with cf.ThreadPoolExecutor(min(self.max_concurrency, len(inputs))) as pool:
            return list(pool.map(lambda i: self._one(i, stop), inputs))

    def _one(self, inp: AnalysisInput, stop: StopToken) -> AnalysisResult:
        stop.check()
        if inp.is_cancelled():  # its batch row is dropped; the other rows go on
            return AnalysisResult(text="", cancelled=True)
        t0 = time.perf_counter()
        img = model_image(self.family, inp)
        w, h = img.size
        g = ImageGeometry(width=w, height=h)
        if self.family == "medgemma":  # zero-pad to a square, as MedGemma was trained
            img = families.pad_to_square(img, g)
        elif self.family == "qwen2_5_vl":
            # Boxes come in pixels of the image the server's processor resized. Resize it here to smart_resize's
            # size (sides multiples of 28, <= QWEN_SEND_MAX_PIXELS): the server's own smart_resize then leaves it
            # as it is, whatever min/max_pixels the server was started with (as long as they admit this size).
            g.model_height, g.model_width = families.smart_resize(h, w, max_pixels=families.QWEN_SEND_MAX_PIXELS)
            if (g.model_width, g.model_height) != (w, h):
                from PIL import Image

                img = img.resize((g.model_width, g.model_height), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        prompt = inp.prompt or families.prompt_for(self.family, inp.task, inp.question, inp.region, g, inp.modality)
        body = {
            "model": self.model,
            "temperature": inp.temperature if inp.temperature is not None else 0.0,
            "max_tokens": inp.max_new_tokens or self.default_max_tokens,
            "messages": _messages(inp, prompt, data_uri),
        }
        remaining = None
        if stop.deadline is not None:
            remaining = max(1.0, stop.deadline - time.monotonic())
        timeout = min(self.timeout_s, remaining or self.timeout_s)
        try:  # streamed from the remote server even when our client does not stream: a cancel then stops it too
            raw, finish, usage = self._streamed(body, inp, stop, timeout)
        except _RowCancelled:
            return AnalysisResult(text="", cancelled=True)
        default_label = inp.question or families.default_detect_label(self.family, inp.modality)
        dec = families.decode_output(
            self.family, raw, g, default_label=default_label if inp.task != REPORT.id else "finding"
        )
        if finish == "length":
            dec.warnings.append(
                f"the answer was cut at max_tokens ({body['max_tokens']}); raise max_new_tokens if "
                "text or boxes are missing"
            )
        if not raw.strip():
            dec.warnings.append("the model server returned an empty answer")
        if inp.task in TEXT_TASKS:
            dec.findings = [] if self.family == "generic" else dec.findings
        return AnalysisResult(
            text=dec.text,
            findings=dec.findings,
            raw_output=raw,
            warnings=dec.warnings,
            timings_ms={"remote": (time.perf_counter() - t0) * 1000, **usage},
        )

    def _streamed(
        self, body: dict, inp: AnalysisInput, stop: StopToken, timeout: float
    ) -> tuple[str, str | None, dict[str, float]]:
        """The remote answer as a stream: each delta to ``inp.on_text`` (when set) as it arrives; (whole text, finish
        reason, token counts). A cancel or the deadline closes the connection (within 20 ms, or at the next chunk)."""
        url = f"{self.url}/chat/completions"
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        try:
            r = self.session.post(url, json=body, headers=self._headers(), timeout=(5.0, timeout), stream=True)
        except requests.exceptions.Timeout:
            raise EngineError(f"the model server at {self.url} did not answer within {timeout:g} s") from None
        except requests.exceptions.ConnectionError:
            raise EngineError(f"cannot reach the model server at {self.url}: is it running?") from None
        with r:
            if r.status_code >= 400:
                detail = r.text[:300].replace("\n", " ")
                raise EngineError(f"the model server at {self.url} answered {r.status_code}: {detail}")
            if not is_event_stream(r):  # a server that ignored stream
                try:
                    data = r.json()
                except ValueError:
                    raise EngineError(f"the model server at {self.url} sent a reply that is not JSON") from None
                raw, finish, usage = _reply(data, self.url)
                DeltaText(inp.on_text or (lambda _t: None)).finish(raw)
                return raw, finish, usage
            return self._relay(r, inp, stop, timeout)

    def _relay(
        self, r, inp: AnalysisInput, stop: StopToken, timeout: float
    ) -> tuple[str, str | None, dict[str, float]]:
        delta = DeltaText(inp.on_text or (lambda _t: None))
        parts = list[str]()
        finish: str | None = None
        usage: dict[str, float] = {}
        try:
            for data in sse_data(r, lambda: inp.is_cancelled() or stop.should_stop()):
                piece, f, u = _chunk(data, self.url)
                finish, usage = f or finish, u or usage
                if piece:
                    parts.append(piece)
                    delta.update("".join(parts))
        except StreamStopped:
            if inp.is_cancelled():
                raise _RowCancelled from None
            raise EngineCancelled("stopped: time limit reached or request cancelled") from None
        except StreamTimedOut:
            raise EngineError(f"the model server at {self.url} did not answer within {timeout:g} s") from None
        except StreamBroken as e:
            raise EngineError(f"the model server at {self.url} broke off its stream ({e})") from None
        text = "".join(parts)
        delta.finish(text)
        return text, finish, usage

    def close(self) -> None:
        self.session.close()


def _usage(data: dict) -> dict[str, float]:
    """The server's token counts as the engine's timings (``prompt_tokens``, ``new_tokens``), when it sent them."""
    u = data.get("usage")
    if not isinstance(u, dict):
        return {}
    out = {}
    for key, name in (("prompt_tokens", "prompt_tokens"), ("completion_tokens", "new_tokens")):
        v = u.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[name] = float(v)
    return out


def _reply(data: dict, url: str) -> tuple[str, str | None, dict[str, float]]:
    """A plain chat completion: (``choices[0].message.content``, finish reason, token counts)."""
    try:
        choice = data["choices"][0]
        raw = choice["message"]["content"]
        if raw is None:  # e.g. a reasoning parser that kept everything in reasoning_content (cut while thinking)
            raw = ""
        if isinstance(raw, list):  # some servers return content parts
            raw = "".join(p.get("text", "") for p in raw if isinstance(p, dict))
        if not isinstance(raw, str):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise EngineError(f"the model server at {url} sent a reply without choices[0].message.content") from None
    return raw, choice.get("finish_reason"), _usage(data)


def _chunk(data: str, url: str) -> tuple[str, str | None, dict[str, float]]:
    """One ``chat.completion.chunk``: (its ``choices[0].delta.content``, finish reason, token counts); an ``error``
    object (what vLLM sends when generation fails mid-stream) is an EngineError."""
    try:
        obj = event_object(data, f"the model server at {url}")
    except StreamEventError as e:
        raise EngineError(str(e)) from None
    choices = obj.get("choices") or []
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    d = choice.get("delta")
    piece = d.get("content") if isinstance(d, dict) else None
    return (piece if isinstance(piece, str) else ""), choice.get("finish_reason"), _usage(obj)


def _messages(inp: AnalysisInput, prompt: str, data_uri: str) -> list[dict]:
    """Chat messages: the earlier turns (the image in the first user message, each answer as the assistant's
    message), then the question."""
    turns = [(t.question or prompt, t.answer) for t in inp.history]
    out: list[dict] = []
    for k, (q, a) in enumerate([*turns, (prompt, None)]):
        image = [{"type": "image_url", "image_url": {"url": data_uri}}] if k == 0 else []
        out.append({"role": "user", "content": [*image, {"type": "text", "text": q}]})
        if a is not None:
            out.append({"role": "assistant", "content": a})
    return out
