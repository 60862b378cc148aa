"""MiniGPT-Med's LLM on a vLLM server: the prompt embeddings go over ``/v1/completions`` as ``prompt_embeds``.

The backend keeps EVA ViT-g, the projector and the LLaMA embedding table, builds exactly the embedding sequence it
feeds its own LLaMA (template, double BOS, the 256 image embeddings spliced in; ``MiniGPTMedEngine._embed_prompt``)
and sends it to a vLLM that serves the folder written by ``convert --for-vllm``.

Wire format (vLLM >= 0.10.2; read in vllm-project/vllm, ``vllm/entrypoints/openai/protocol.py`` ``CompletionRequest``
and ``vllm/renderers/embed_utils.py`` ``safe_load_prompt_embeds``; docs.vllm.ai ``features/prompt_embeds``):

* ``prompt_embeds``: base64 (standard alphabet, padded) of the bytes ``torch.save`` writes for ONE tensor of shape
  ``[num_tokens, hidden_size]`` (a leading batch dim of 1 is squeezed); float32, float16 or bfloat16. vLLM loads it
  with ``torch.load(..., weights_only=True, map_location="cpu")``. Recent vLLM casts it to the served dtype and
  checks ``hidden_size``; older ones require the dtype to match. We send the dtype the backend's own LLaMA would
  use (float16 with a CUDA backend), from a CPU, contiguous copy (``torch.save`` of a view writes its whole storage).
* no ``prompt``: vLLM applies no template and adds no BOS to embeddings; the sequence already holds both BOS.
* ``temperature: 0`` = greedy (always sent: vLLM otherwise takes defaults from generation_config.json or 1.0).
* ``return_token_ids: true``: ``choices[0].token_ids`` are decoded with the backend's own tokenizer and
  post-processing, exactly as for the local LLaMA (the server's detokenizer is not used). vLLM includes the EOS
  id in ``token_ids`` when it stopped there; ``finish_reason`` is ``stop`` or ``length``.
* ``stream: true``, always (read in ``vllm/entrypoints/openai/serving_completion.py``
  ``completion_stream_generator``, v0.10.2 to v0.11; ``vllm/entrypoints/openai/completion/serving.py`` in later
  releases): ``text/event-stream`` of ``data: {"object": "text_completion", "choices": [{"index": 0, "text": DELTA,
  "token_ids": [NEW IDS], "finish_reason": null | "stop" | "length"}]}`` events, then ``data: [DONE]``; a failure
  mid-stream is a ``data: {"error": {...}}`` event. Each event's new ids go to ``on_ids`` as they arrive (the engine
  decodes the growing answer and streams it), and a cancel of the row or the whole call (or the deadline) closes the
  connection at once (``backend.remote_stream``), upon which vLLM aborts the request. A server that answers with one
  JSON completion instead is read as such.

A batch goes out as concurrent requests (one per row, all of a batch at once up to ``max_concurrency``): vLLM
batches them continuously, so several replicas or tensor parallelism behind one URL scale the LLM part. A cancelled
row closes only its own stream.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import time
from collections.abc import Callable, Sequence
from typing import Any

import requests
import torch

from ..remote_stream import (
    StreamBroken,
    StreamEventError,
    StreamStopped,
    StreamTimedOut,
    event_object,
    is_event_stream,
    sse_data,
)
from .generate import GREEDY, GenerationOutput, RowStopped, SamplingSettings

RowIds = Callable[[int, list[int]], None]  # (row, the ids that just arrived for it)

PROMPT_EMBEDS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VLLM_MIN_VERSION = "0.10.2"  # return_token_ids


class RemoteLLMError(Exception):
    """The vLLM server is unreachable or answered something we cannot use."""


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    """[L, H] float tensor -> the base64 string vLLM's ``prompt_embeds`` takes (``torch.save`` bytes)."""
    if embeds.dim() != 2 or embeds.dtype not in PROMPT_EMBEDS_DTYPES:
        raise ValueError(f"prompt embeddings must be a 2-D float tensor, got {tuple(embeds.shape)} {embeds.dtype}")
    t = embeds.detach().to("cpu").contiguous().clone()  # its own storage: torch.save writes a view's whole storage
    buf = io.BytesIO()
    torch.save(t, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def completion_body(
    model: str, embeds: torch.Tensor, max_tokens: int, settings: SamplingSettings, seed: int | None, ignore_eos: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt_embeds": encode_prompt_embeds(embeds),
        "max_tokens": int(max_tokens),
        "temperature": 0.0,
        "n": 1,
        "stream": True,
        "return_token_ids": True,
        "ignore_eos": bool(ignore_eos),
    }
    if settings.do_sample:
        body.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or -1)
        if settings.repetition_penalty != 1.0:
            body["repetition_penalty"] = settings.repetition_penalty
        if seed is not None:
            body["seed"] = int(seed)
    return body


def parse_completion(data: Any, eos_id: int, max_tokens: int, ignore_eos: bool) -> tuple[list[int], bool]:
    """A ``/v1/completions`` reply -> (generated ids without EOS, finished at EOS)."""
    try:
        choice = data["choices"][0]
        ids = choice.get("token_ids")
    except (KeyError, IndexError, TypeError):
        raise RemoteLLMError("the reply has no choices[0]") from None
    return _finish(_token_ids(ids), choice.get("finish_reason"), eos_id, max_tokens, ignore_eos)


def _token_ids(ids: Any) -> list[int]:
    if ids is None:
        raise RemoteLLMError(
            f"the reply has no choices[0].token_ids: the server must be vLLM >= {VLLM_MIN_VERSION} (return_token_ids)"
        )
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise RemoteLLMError("choices[0].token_ids is not a list of integers")
    return ids


def _finish(ids: list[int], reason: Any, eos_id: int, max_tokens: int, ignore_eos: bool) -> tuple[list[int], bool]:
    ids = ids[:max_tokens]
    if not ignore_eos and eos_id in ids:
        return ids[: ids.index(eos_id)], True
    return ids, (not ignore_eos and reason == "stop")


def stream_chunk(data: str, url: str) -> tuple[list[int], Any, bool]:
    """One event of a ``/v1/completions`` stream from the vLLM server at ``url`` -> (its new token ids, its finish
    reason, whether it held a choice); an ``error`` object (a failure mid-stream) is a RemoteLLMError."""
    try:
        obj = event_object(data, f"the vLLM server at {url}")
    except StreamEventError as e:
        raise RemoteLLMError(str(e)) from None
    choices = obj.get("choices")
    if not choices:  # the usage event (choices: [])
        return [], None, False
    choice = choices[0] if isinstance(choices, list) and isinstance(choices[0], dict) else None
    if choice is None:
        raise RemoteLLMError(f"the vLLM server at {url} sent a stream event without choices[0]")
    return _token_ids(choice.get("token_ids")), choice.get("finish_reason"), True


class VLLMClient:
    """Generation on a vLLM server with the same call as ``backend.minigpt.generate.generate``."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_concurrency: int = 8,
    ):
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.session = requests.Session()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(self, method: str, path: str, body: dict | None, timeout: float, stream: bool = False):
        try:
            r = self.session.request(
                method, self.url + path, json=body, headers=self._headers(), timeout=(5.0, timeout), stream=stream
            )
        except requests.exceptions.Timeout:
            raise RemoteLLMError(f"the vLLM server at {self.url} did not answer within {timeout:g} s") from None
        except requests.exceptions.ConnectionError:
            raise RemoteLLMError(f"cannot reach the vLLM server at {self.url}: is it running?") from None
        if r.status_code >= 400:
            with r:
                try:
                    err = r.json()
                    msg = (err.get("error") or {}).get("message") if isinstance(err.get("error"), dict) else None
                    msg = msg or err.get("message") or r.text
                except (ValueError, AttributeError):
                    msg = r.text
            raise RemoteLLMError(
                f"the vLLM server at {self.url} answered {r.status_code}: {str(msg)[:300].replace(chr(10), ' ')}"
            )
        return r

    def _json(self, r: requests.Response) -> Any:
        try:
            return r.json()
        except ValueError:
            raise RemoteLLMError(f"the vLLM server at {self.url} sent a reply that is not JSON") from None

    def _call(self, method: str, path: str, body: dict | None, timeout: float) -> Any:
        with self._request(method, path, body, timeout) as r:
            return self._json(r)

    def _complete(
        self,
        body: dict,
        timeout: float,
        eos_id: int,
        max_tokens: int,
        ignore_eos: bool,
        stopped: Callable[[], bool],
        on_ids: Callable[[list[int]], None] | None,
    ) -> tuple[list[int], bool]:
        """One streamed completion -> (generated ids without EOS, finished at EOS); StreamStopped when
        ``stopped()`` turned true (the connection is closed)."""
        with self._request("POST", "/completions", body, timeout, stream=True) as r:
            if not is_event_stream(r):  # a server that ignored stream
                return parse_completion(self._json(r), eos_id, max_tokens, ignore_eos)
            ids: list[int] = []
            reason: Any = None
            seen = False
            try:
                for data in sse_data(r, stopped):
                    new, f, had_choice = stream_chunk(data, self.url)
                    seen, reason = seen or had_choice, f or reason
                    if new:
                        ids += new
                        if on_ids is not None:
                            on_ids(new)
            except StreamTimedOut:
                raise RemoteLLMError(f"the vLLM server at {self.url} did not answer within {timeout:g} s") from None
            except StreamBroken as e:
                raise RemoteLLMError(f"the vLLM server at {self.url} broke off its stream ({e})") from None
            if not seen:
                raise RemoteLLMError(f"the vLLM server at {self.url} sent a stream without choices")
            return _finish(ids, reason, eos_id, max_tokens, ignore_eos)

    def connect(self) -> str:
        """Check the server and pick the served model (the first, unless one was named). Returns its name."""
        data = self._call("GET", "/models", None, 10.0)
        ids = [m.get("id") for m in (data.get("data") or []) if isinstance(m, dict)] if isinstance(data, dict) else []
        if self.model is None:
            if not ids:
                raise RemoteLLMError(f"the vLLM server at {self.url} lists no models")
            self.model = str(ids[0])
        elif ids and self.model not in ids:
            raise RemoteLLMError(f"the vLLM server at {self.url} serves {', '.join(map(str, ids))}, not {self.model}")
        return self.model

    def generate(
        self,
        embeds: Sequence[torch.Tensor],
        max_new_tokens: Sequence[int] | int,
        eos_id: int,
        bos_id: int,
        settings: SamplingSettings = GREEDY,
        stop=None,
        seed: int | None = None,
        ignore_eos: bool = False,
        row_stopped: RowStopped | None = None,
        on_ids: RowIds | None = None,
    ) -> GenerationOutput:
        """``stop``: the call's StopToken (its deadline too); ``row_stopped()``: which rows were cancelled (each row's
        stream closes on its own); ``on_ids(row, new_ids)`` as each row's ids arrive (from the row's thread)."""
        del bos_id  # the sequence already starts with both BOS embeddings
        if self.model is None:
            self.connect()
        b = len(embeds)
        maxes = [int(max_new_tokens)] * b if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
        t0 = time.perf_counter()

        def row_cancelled(i: int) -> bool:
            return row_stopped is not None and bool(row_stopped()[i])

        def one(i: int) -> tuple[list[int], bool, bool]:
            if stop is not None:
                stop.check()
            if row_cancelled(i):
                return [], False, True
            timeout = self.timeout_s
            if stop is not None and stop.deadline is not None:
                timeout = max(1.0, min(timeout, stop.deadline - time.monotonic()))
            body = completion_body(str(self.model), embeds[i], maxes[i], settings, seed, ignore_eos)
            feed = None if on_ids is None else (lambda new, i=i: on_ids(i, new))
            stopped = (lambda: stop.should_stop() or row_cancelled(i)) if stop is not None else lambda: row_cancelled(i)
            try:
                ids, finished = self._complete(body, timeout, eos_id, maxes[i], ignore_eos, stopped, feed)
            except StreamStopped:
                if stop is not None:
                    stop.check()  # the call's own cancel or deadline: EngineCancelled
                return [], False, True
            return ids, finished, False

        if b == 1:
            rows = [one(0)]
        else:
            with cf.ThreadPoolExecutor(min(self.max_concurrency, b)) as pool:
                rows = list(pool.map(one, range(b)))
        t1 = time.perf_counter()
        return GenerationOutput(
            tokens=[r[0] for r in rows],
            finished=[r[1] for r in rows],
            prefill_s=0.0,
            decode_s=t1 - t0,
            steps=max((len(r[0]) for r in rows), default=0),
            prompt_lengths=[int(e.shape[0]) for e in embeds],
            cancelled=[r[2] for r in rows],
        )

    def close(self) -> None:
        self.session.close()
