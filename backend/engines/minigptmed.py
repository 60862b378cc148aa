"""The MiniGPT-Med engine: the original MiniGPT-Med checkpoints through ``backend.minigpt``.

Tasks and the instruction text sent (inside ``<s>[INST] <Img><ImageHere></Img> {text} [/INST]``):

* report   -> ``Describe this image in detail`` (the first of the MIMIC-CXR report prompts)
* vqa      -> ``[vqa] {question}``
* detect   -> ``[detection] {label}`` (label = the question, else ``tumor`` for CT/MR, ``pneumonia`` for X-ray)
* ground   -> ``[refer] {phrase}``
* identify -> ``[identify] what object is in this location {<x1><y1><x2><y2>}`` (region on the 0..100 grid)

A request's ``prompt`` replaces the instruction text verbatim. Earlier turns (``history``) are rebuilt with their own
task tags and their answers as the model wrote them, in the original demo's conversation template
(``backend.minigpt.tokenization.build_prompt``); a context longer than 2000 positions (prompt + new tokens) is cut from
the left as the original does, with a warning. The EVA + projector embeddings of recent images are kept in a bounded
LRU (``cache_size`` entries, ``cache_bytes``), keyed by the image's content id, so a follow-up skips the vision encoder.
Streaming (``AnalysisInput.on_text``) and per-request cancel (``AnalysisInput.cancelled``) work in both decode paths
and on the vLLM route (``backend.minigpt.vllm_client``: each row reads vLLM's own stream of token ids, decoded here as
they arrive; a cancelled row closes its connection and vLLM stops).

The ``static_decode`` setting switches decoding to a preallocated KV cache with one batch bucket per power of two up
to ``max_batch`` (``backend.minigpt.static_decode``); on CUDA each bucket's decode step is captured into a CUDA graph
at load time, and load also runs the vision encoder and a short generation in every bucket, so the first request pays
no warm-up. Requests longer than ``static_max_len`` (default 1024) tokens fall back to the dynamic cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from MiniGPTMedSlicerLib.protocol import DETECT, GROUND, IDENTIFY, REPORT, TASKS, VQA, Finding

from ..lru import LRUStore
from ..setting_error import SettingError
from ..settings import MiniGPTMedSettings
from .base import (
    AnalysisInput,
    AnalysisResult,
    Engine,
    EngineError,
    EngineInfo,
    StopToken,
    TaskNotSupported,
    Turn,
)
from .text_stream import DeltaText

log = logging.getLogger("minigptmed.engine")

REPORT_PROMPT = "Describe this image in detail"
#: MiniGPT-Med's eval yaml: 300 new tokens for the text tasks, 100 for the box tasks.
DEFAULT_MAX_NEW_TOKENS = {REPORT.id: 300, VQA.id: 300, DETECT.id: 100, GROUND.id: 100, IDENTIFY.id: 100}


def _on_step(feeds: dict[int, Callable[[Sequence[int]], None]]):
    """The local decoders' per-step callback (the ids chosen at one step, one per row) over the rows' feeds, or None
    when no row streams."""
    if not feeds:
        return None

    def on_step(step_ids: list[int]) -> None:
        for j, feed in feeds.items():
            feed((step_ids[j],))

    return on_step


def turn_instruction(turn: Turn) -> str:
    """An earlier turn's instruction, tagged as a single turn of its task would be (its region is not kept: an
    earlier identify turn keeps its question text)."""
    q = (turn.question or "").strip()
    if turn.task == REPORT.id:
        return q or REPORT_PROMPT
    if turn.task == VQA.id:
        return f"[vqa] {q}"
    if turn.task == DETECT.id:
        return f"[detection] {q or 'tumor'}"
    if turn.task == GROUND.id:
        return f"[refer] {q}"
    return f"[identify] {q}" if q else "[identify]"


def instruction_for(inp: AnalysisInput) -> tuple[str, str]:
    """(instruction text, default label for boxes)."""
    from backend.box_codecs import pixels_to_grid100
    from backend.families import default_detect_label
    from backend.minigpt.boxes import format_grid_box

    q = (inp.question or "").strip()
    label = q or default_detect_label("minigptmed", inp.modality)
    if inp.prompt:
        return inp.prompt, label
    if inp.task == REPORT.id:
        return REPORT_PROMPT, label
    if inp.task == VQA.id:
        return f"[vqa] {q or 'what abnormality is seen in this image?'}", label
    if inp.task == DETECT.id:
        return f"[detection] {label}", label
    if inp.task == GROUND.id:
        return f"[refer] {label}", label
    if inp.task == IDENTIFY.id:
        if inp.region is None:
            raise TaskNotSupported("identify needs a region")
        g = pixels_to_grid100(inp.region, inp.image.width, inp.image.height)
        return f"[identify] what object is in this location {format_grid_box(g)}", label
    raise TaskNotSupported(f"task {inp.task!r} is not supported by the MiniGPT-Med engine")


@dataclass
class _Item:
    inp: AnalysisInput
    instruction: str
    label: str
    key: str
    max_new: int
    settings: Any
    warnings: list[str] = field(default_factory=list)
    stream: DeltaText | None = None


@dataclass
class _RowFeed:
    """One streaming row: its ids so far, decoded and post-processed into its DeltaText as they grow."""

    delta: DeltaText
    decode: Callable[[list[int]], str]
    eos: int
    ids: list[int] = field(default_factory=list)
    done: bool = False

    def __call__(self, new: Sequence[int]) -> None:
        if self.done:
            return
        for t in new:
            if t == self.eos:
                self.done = True
                break
            self.ids.append(int(t))
        self.delta.update(self.decode(self.ids))


class MiniGPTMedEngine(Engine):
    def __init__(self, settings: MiniGPTMedSettings | None = None):
        s = settings or MiniGPTMedSettings()
        self.settings = s
        self.paths: dict[str, Any] = {
            "eva": s.eva,
            "llama": s.llama,
            "checkpoint": s.checkpoint,
            "converted": s.converted,
        }
        self.model_config = s.model_config
        self.quantize = s.quantize
        self.sampling = s.sampling
        self.merge_lora = s.merge_lora
        self.max_batch = s.max_batch
        self.cache_size = s.cache_size
        self.seed = s.seed
        self.model: Any = None
        self.tokenizer: Any = None
        self.cfg: Any = None
        self.report: Any = None
        self._cache: LRUStore[Any] = LRUStore(s.cache_size, s.cache_bytes)
        self.vision_calls = 0  # images run through the vision encoder (a cache hit does not count)
        self._lock = threading.Lock()
        self.device = "cpu"
        self.dtype: Any = None
        self.static_decode = s.static_decode
        self.static_max_len = s.static_max_len
        self._static: Any = None  # StaticDecoder, made at load when static_decode is on
        self._remote: Any = None  # VLLMClient when the LLM runs on a vLLM server

    # -- loading ---------------------------------------------------------------------------------------------------

    def _resolve_device(self):
        import torch

        from backend.torch_utils import parse_dtype, resolve_device

        dev = resolve_device(self.settings.device)
        dtype = parse_dtype(self.settings.dtype)
        if dtype is None:
            dtype = torch.float16 if dev.startswith("cuda") else torch.float32
        if dev == "cpu" and dtype == torch.float16:
            raise SettingError("{dtype} float16 is not supported on the CPU; use float32 or bfloat16", "dtype")
        return dev, dtype

    def load(self) -> None:
        from backend.minigpt.config import MiniGPTMedConfig
        from backend.minigpt.tokenization import MiniGPTTokenizer
        from backend.minigpt.weights import LoadOptions, WeightsError, is_converted, load_converted, load_original

        self.device, self.dtype = self._resolve_device()
        opts = LoadOptions(
            device=self.device,
            dtype=self.dtype,
            quantize=self.quantize,
            merge_lora=self.merge_lora,
            trust_checkpoints=self.settings.trust_checkpoints,
        )
        try:
            if self.settings.vllm_url:
                tok_dir = self._load_for_vllm(opts)
            elif self.paths["converted"]:
                if not is_converted(self.paths["converted"]):
                    raise SettingError(
                        "{converted} " + str(self.paths["converted"]) + ": not a converted MiniGPT-Med folder",
                        "converted",
                    )
                self.model, self.cfg, self.report = load_converted(self.paths["converted"], opts)
                tok_dir = f"{self.paths['converted']}/llm"
            else:
                missing = [k for k in ("eva", "llama", "checkpoint") if not self.paths[k]]
                if missing:
                    names = ", ".join("{" + k + "}" for k in missing)
                    raise SettingError(
                        f"the MiniGPT-Med engine needs {names} (or {{converted}})", *missing, "converted"
                    )
                self.cfg = MiniGPTMedConfig.from_json(self.model_config)
                self.model, self.report = load_original(
                    self.paths["eva"], self.paths["llama"], self.paths["checkpoint"], self.cfg, opts
                )
                tok_dir = self.paths["llama"]
            self.tokenizer = MiniGPTTokenizer(tok_dir)
        except SettingError:
            raise
        except WeightsError as e:
            raise EngineError(str(e)) from e
        if self.static_decode and self.quantize != "none":
            log.warning("static_decode is ignored with quantize")
            self.static_decode = False
        if self.static_decode:
            self._warm_static()
        log.info(
            "MiniGPT-Med loaded from %s files in %.1f s on %s (%s, LoRA %s); generation settings: %s "
            "(the LLaMA folder's generation_config.json is not used)",
            self.report.source,
            self.report.seconds,
            self.device,
            str(self.dtype).replace("torch.", ""),
            self.report.lora,
            self.sampling,
        )

    def _load_for_vllm(self, opts) -> str:
        """EVA, projector and the embedding table here; the LLM on the vLLM server (``vllm_client``)."""
        from backend.minigpt.config import MiniGPTMedConfig
        from backend.minigpt.vision_only import load_vision_and_embeddings
        from backend.minigpt.vllm_client import RemoteLLMError, VLLMClient

        s = self.settings
        if self.quantize != "none":
            raise SettingError("{quantize} does not apply with {vllm_url}: the LLM runs on the vLLM server", "quantize")
        if not self.paths["converted"]:
            missing = [k for k in ("eva", "llama", "checkpoint") if not self.paths[k]]
            if missing:
                names = ", ".join("{" + k + "}" for k in missing)
                raise SettingError(f"the MiniGPT-Med engine needs {names} (or {{converted}})", *missing, "converted")
        cfg = None if self.paths["converted"] else MiniGPTMedConfig.from_json(self.model_config)
        self.model, self.cfg, self.report, tok_dir = load_vision_and_embeddings(
            opts,
            eva=self.paths["eva"],
            llama=self.paths["llama"],
            checkpoint=self.paths["checkpoint"],
            converted=self.paths["converted"],
            cfg=cfg,
        )
        self._remote = VLLMClient(
            str(s.vllm_url), s.vllm_model, s.vllm_api_key, s.vllm_timeout_s, max_concurrency=self.max_batch
        )
        try:
            served = self._remote.connect()
        except RemoteLLMError as e:
            raise EngineError(str(e)) from e
        self.static_decode = False
        log.info("MiniGPT-Med's LLM runs on the vLLM server at %s (%s)", self._remote.url, served)
        return str(tok_dir)

    def _decoder(self):
        from backend.minigpt.static_decode import StaticDecoder

        if self._static is None:
            self._static = StaticDecoder(self.model.llm, self.max_batch, self.static_max_len)
        return self._static

    def _warm_static(self) -> None:
        """At load, so that no request pays it: capture the CUDA graphs, run the vision encoder at batch 1 and
        ``max_batch`` and a short generation in every batch bucket (prefill and decode at the real prompt size)."""
        import torch

        t0 = time.perf_counter()
        dec = self._decoder()
        dec.capture()
        h = self.model.llm.config.hidden_size
        dt = self.model.llm.get_input_embeddings().weight.dtype
        size = self.cfg.vision.image_size
        with torch.inference_mode():
            for rows in sorted({1, self.max_batch}):
                self.model.encode_images(torch.zeros(rows, 3, size, size))
            for rows in dec.buckets:
                prompts = [torch.zeros(self.cfg.image_tokens + 40, h, dtype=dt, device=self.model.device)] * rows
                dec.generate(prompts, 4, eos_id=-1, bos_id=self.tokenizer.bos_id)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        log.info(
            "static decode ready in %.1f s (batch buckets %s, %s)",
            time.perf_counter() - t0,
            dec.buckets,
            f"CUDA graphs captured in {dec.capture_s:.1f} s" if dec.use_graphs else "no CUDA graphs",
        )

    def info(self) -> EngineInfo:
        dt = str(self.dtype).replace("torch.", "") if self.dtype is not None else "?"
        q = "" if self.quantize == "none" else f", {self.quantize}"
        name = self.cfg.name if self.cfg else "MiniGPT-Med"
        device = f"{self.device} ({dt}{q})"
        if self._remote is not None:
            name += f"; LLM {self._remote.model} on vLLM"
            device = f"{self.device} ({dt}, vision) + vLLM at {self._remote.url}"
        return EngineInfo(engine="minigptmed", model=name, device=device, tasks=TASKS, max_batch=self.max_batch)

    def close(self) -> None:
        self.model = None
        self._static = None  # its KV cache and graphs hold GPU memory
        self._cache.clear()
        if self._remote is not None:
            self._remote.close()

    # -- inference --------------------------------------------------------------------------------------------------

    def _settings(self, inp: AnalysisInput):
        from dataclasses import replace

        from backend.minigpt.generate import DEMO, DEMO_MAX_NEW_TOKENS, GREEDY

        if inp.temperature is not None:
            s = GREEDY if inp.temperature == 0 else replace(DEMO, temperature=float(inp.temperature))
        else:
            s = DEMO if self.sampling == "demo" else GREEDY
        default_max = DEMO_MAX_NEW_TOKENS if s.do_sample else DEFAULT_MAX_NEW_TOKENS.get(inp.task, 300)
        return s, int(inp.max_new_tokens or default_max)

    def _image_embeds(self, items: list[_Item], timings: dict) -> dict:
        """key -> [T, H] image embeddings, from the cache or encoded in one batch."""
        import torch

        from backend.minigpt.preprocess import normalize, resized_rgb

        out, todo = {}, {}
        t0 = time.perf_counter()
        for it in items:
            hit = self._cache.get(it.key)
            if hit is not None:
                out[it.key] = hit
            elif it.key not in todo:
                todo[it.key] = normalize(resized_rgb(it.inp.image.pixels8(), self.cfg.vision.image_size))
        t1 = time.perf_counter()
        if todo:
            pixels = torch.stack(list(todo.values()))
            emb = self.model.encode_images(pixels)
            self.vision_calls += len(todo)
            for k, e in zip(todo, emb, strict=True):
                out[k] = e
                self._cache.put(k, e, e.numel() * e.element_size())
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        timings["preprocess_ms"] = (t1 - t0) * 1000
        timings["vision_ms"] = (time.perf_counter() - t1) * 1000
        timings["vision_cached"] = float(len(todo) == 0)
        return out

    def _embed_prompt(self, it: _Item, image_emb):
        from backend.minigpt.tokenization import build_prompt, left_truncation
        from backend.prompt_embeds import splice_image

        history = [(turn_instruction(t), t.answer) for t in it.inp.history]
        segs = self.tokenizer.prompt_segments(build_prompt(it.instruction, history))
        # the image in the text's dtype: the embedding table's (the whole LLM's, or on the vLLM route the table alone)
        dtype = self.model.llm.get_input_embeddings().weight.dtype
        emb = splice_image(self.model.embed_tokens, segs, image_emb, dtype)
        cut = left_truncation(int(emb.shape[0]), it.max_new)
        if cut:
            it.warnings.append(
                f"the conversation is longer than the model's 2000-token context: its first {cut} positions were "
                "dropped, as the original does"
            )
            log.warning("conversation context cut from the left by %d positions", cut)
            emb = emb[cut:]
        return emb

    def analyze_batch(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        import torch

        if self.model is None:
            raise EngineError("the MiniGPT-Med engine is not loaded")
        from backend.minigpt.boxes import parse_answer
        from backend.minigpt.generate import generate
        from backend.minigpt.tokenization import postprocess_benchmark, postprocess_demo

        items = []
        for inp in inputs:
            if inp.task not in TASKS:
                raise TaskNotSupported(f"task {inp.task!r} is not supported by the MiniGPT-Med engine")
            instr, label = instruction_for(inp)
            s, mx = self._settings(inp)
            items.append(_Item(inp, instr, label, inp.cache_key(), mx, s))
        results: list[AnalysisResult | None] = [None] * len(items)
        with self._lock, torch.inference_mode():
            try:
                timings: dict[str, float] = {}
                embs = self._image_embeds(items, timings)
                groups: dict[Any, list[int]] = {}
                for i, it in enumerate(items):
                    groups.setdefault(it.settings, []).append(i)
                for s, idx in groups.items():
                    for start in range(0, len(idx), self.max_batch):
                        chunk = idx[start : start + self.max_batch]
                        live = [i for i in chunk if not items[i].inp.is_cancelled()]
                        for i in chunk:
                            if i not in live:
                                results[i] = AnalysisResult(text="", cancelled=True)
                        chunk = live
                        if not chunk:
                            continue
                        prompts = [self._embed_prompt(items[i], embs[items[i].key]) for i in chunk]
                        maxes = [items[i].max_new for i in chunk]
                        kw: dict[str, Any] = dict(
                            eos_id=self.tokenizer.eos_id,
                            bos_id=self.tokenizer.bos_id,
                            settings=s,
                            stop=stop,
                            seed=self.seed,
                            row_stopped=lambda chunk=chunk: [items[i].inp.is_cancelled() for i in chunk],
                        )
                        feeds = self._row_feeds([items[i] for i in chunk], s)
                        on_step = _on_step(feeds)
                        if self._remote is not None:  # each row streams from its own vLLM request
                            if feeds:
                                kw["on_ids"] = lambda j, new, feeds=feeds: feeds[j](new) if j in feeds else None
                            g = self._remote_generate(prompts, maxes, kw)
                        elif (
                            self.static_decode and max(p.shape[0] for p in prompts) + max(maxes) <= self.static_max_len
                        ):
                            kw["on_step"] = on_step
                            g = self._decoder().generate(prompts, maxes, **kw)
                        else:
                            g = generate(self.model.llm, prompts, maxes, on_step=on_step, **kw)
                        for j, i in enumerate(chunk):
                            if j < len(g.cancelled) and g.cancelled[j]:
                                results[i] = AnalysisResult(text="", cancelled=True)
                                continue
                            results[i] = self._result(
                                items[i],
                                g,
                                j,
                                timings,
                                s,
                                parse_answer,
                                postprocess_demo if s.do_sample else postprocess_benchmark,
                            )
            except torch.cuda.OutOfMemoryError as e:
                raise EngineError(f"GPU out of memory: {e}") from e
        return [r for r in results if r is not None]

    def _remote_generate(self, prompts, maxes, kw):
        from backend.minigpt.vllm_client import RemoteLLMError

        try:
            return self._remote.generate(prompts, maxes, **kw)
        except RemoteLLMError as e:
            raise EngineError(str(e)) from e

    def _row_feeds(self, chunk: list[_Item], s) -> dict[int, Callable[[Sequence[int]], None]]:
        """For each streaming row (index in ``chunk``): a callback taking its newly generated ids (one per decode step
        locally, a chunk's worth from vLLM) that feeds the growing answer to its ``on_text`` (post-processed as the
        final answer is, so the deltas add up to it); nothing after the EOS."""
        from backend.minigpt.tokenization import postprocess_benchmark, postprocess_demo

        post = postprocess_demo if s.do_sample else postprocess_benchmark
        eos = self.tokenizer.eos_id
        feeds: dict[int, Callable[[Sequence[int]], None]] = {}
        for j, it in enumerate(chunk):
            if it.inp.on_text is None:
                continue
            it.stream = DeltaText(it.inp.on_text)
            feeds[j] = _RowFeed(it.stream, lambda ids: post(self.tokenizer.decode(ids)), eos)
        return feeds

    def _result(self, it: _Item, g, j: int, timings: dict, s, parse_answer, post) -> AnalysisResult:
        answer = post(self.tokenizer.decode(g.tokens[j]))
        if it.stream is not None:
            it.stream.finish(answer)
        t = dict(timings)
        t.update(
            prefill_ms=g.prefill_s * 1000,
            decode_ms=g.decode_s * 1000,
            new_tokens=float(len(g.tokens[j])),
            prompt_tokens=float(g.prompt_lengths[j]),
        )
        warnings = list(it.warnings)
        if not g.finished[j]:
            warnings.append(f"answer cut at max_new_tokens={it.max_new}")
        inp = it.inp
        if inp.task == IDENTIFY.id:
            region = inp.region or (0.0, 0.0, float(inp.image.width), float(inp.image.height))
            findings = [Finding(label=answer[:120] or it.label, box=[float(v) for v in region])]
            return AnalysisResult(text=answer, findings=findings, raw_output=answer, warnings=warnings, timings_ms=t)
        parsed = parse_answer(
            answer,
            inp.image.width,
            inp.image.height,
            default_label=it.label,
            bare_box=inp.task in (DETECT.id, GROUND.id),
        )
        findings = [Finding(label=b.label, box=b.box) for b in parsed.boxes]
        warnings += parsed.warnings
        if inp.task in (DETECT.id, GROUND.id) and not findings:
            warnings.append("the model answered without a box")
        return AnalysisResult(
            text=parsed.text or answer, findings=findings, raw_output=answer, warnings=warnings, timings_ms=t
        )
