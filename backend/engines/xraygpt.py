"""``--engine xraygpt``: XrayGPT (mbzuai-oryx/XrayGPT, MiniGPT-4 v1 architecture) from its released files.

Tasks: ``report`` (the demo's first example prompt, ``Describe the given chest x-ray image in detail.``) and ``vqa``
(the question as typed, as in the demo). XrayGPT emits no boxes, so detect/ground/identify answer 501. A request's
``prompt`` replaces the question text verbatim. Image: gray -> RGB, squash-resized to 224 px (bicubic), CLIP
mean/std (``blip2_image_eval`` at 224, as eval_configs/xraygpt_eval.yaml sets it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from MiniGPTMedSlicerLib.protocol import REPORT, VQA

from ..setting_error import SettingError
from ..settings import XrayGPTSettings
from .base import AnalysisInput, AnalysisResult, Engine, EngineError, EngineInfo, StopToken, TaskNotSupported

log = logging.getLogger("minigptmed.xraygpt")

TASKS = (REPORT.id, VQA.id)


class XrayGPTEngine(Engine):
    def __init__(self, settings: XrayGPTSettings):
        self.s = settings
        self.model: Any = None
        self.tokenizer: Any = None
        self.cfg: Any = None
        self.report: Any = None
        self.stops: list[list[int]] = []
        self.device = "cpu"
        self.dtype: Any = None
        self._lock = threading.Lock()

    def _resolve(self):
        import torch

        from ..torch_utils import parse_dtype, resolve_device

        dev = resolve_device(self.s.device)
        dtype = parse_dtype(self.s.dtype) or (torch.float16 if dev.startswith("cuda") else torch.float32)
        if dev == "cpu" and dtype == torch.float16:
            raise SettingError("{dtype} float16 is not supported on the CPU; use float32 or bfloat16", "dtype")
        return dev, dtype

    def load(self) -> None:
        from backend.minigpt.tokenization import MiniGPTTokenizer
        from backend.minigpt.weights import LoadOptions, WeightsError
        from backend.xraygpt.config import XrayGPTConfig
        from backend.xraygpt.weights import load_converted, load_original

        missing = (
            [] if self.s.converted else [k for k in ("eva", "qformer", "llama", "checkpoint") if not getattr(self.s, k)]
        )
        if missing:
            raise SettingError("the XrayGPT engine needs " + ", ".join("{" + k + "}" for k in missing), *missing)
        self.device, self.dtype = self._resolve()
        try:
            self.cfg = XrayGPTConfig.from_json(self.s.model_config)
        except (OSError, ValueError) as e:
            raise SettingError("{model_config} " + f"{self.s.model_config}: {e}", "model_config") from e
        opts = LoadOptions(device=self.device, dtype=self.dtype, quantize=self.s.quantize)
        try:
            if self.s.converted:
                self.model, self.cfg, self.report = load_converted(str(self.s.converted), opts)
                self.tokenizer = MiniGPTTokenizer(f"{self.s.converted}/llm")
            else:
                self.model, self.report = load_original(
                    str(self.s.eva),
                    str(self.s.qformer),
                    str(self.s.llama),
                    str(self.s.checkpoint),
                    self.cfg,
                    opts,
                    trust=self.s.trust_checkpoints,
                )
                self.tokenizer = MiniGPTTokenizer(str(self.s.llama))
        except SettingError:
            raise
        except (WeightsError, FileNotFoundError) as e:
            raise EngineError(str(e)) from e
        self._loaded_log()

    def _loaded_log(self) -> None:
        from backend.xraygpt.template import stop_sequences

        self.stops = stop_sequences(self.tokenizer)
        log.info(
            "XrayGPT loaded in %.1f s on %s (%s); stop words %s; ignored: %s",
            self.report.seconds,
            self.device,
            str(self.dtype).replace("torch.", ""),
            self.stops,
            {k: len(v) for k, v in self.report.ignored.items()},
        )

    def info(self) -> EngineInfo:
        dt = str(self.dtype).replace("torch.", "") if self.dtype is not None else "?"
        name = self.cfg.name if self.cfg else "XrayGPT"
        return EngineInfo(engine="xraygpt", model=name, device=f"{self.device} ({dt})", tasks=TASKS, max_batch=1)

    def close(self) -> None:
        self.model = None

    def _question(self, inp: AnalysisInput) -> str:
        from backend.xraygpt.template import REPORT_PROMPT

        if inp.prompt:
            return inp.prompt
        if inp.task == REPORT.id:
            return REPORT_PROMPT
        q = (inp.question or "").strip()
        if not q:
            raise TaskNotSupported("vqa needs a question")
        return q

    def _embed(self, question: str, image_emb):
        from backend.prompt_embeds import splice_image
        from backend.xraygpt.template import build_prompt

        segs = self.tokenizer.prompt_segments(build_prompt(question))
        dtype = self.model.llm.get_input_embeddings().weight.dtype
        return splice_image(self.model.embed_tokens, segs, image_emb, dtype)

    def analyze_batch(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        import torch

        from backend.minigpt.preprocess import normalize, resized_rgb
        from backend.xraygpt.generate import DEMO_MAX_NEW_TOKENS, generate
        from backend.xraygpt.template import postprocess

        if self.model is None:
            raise EngineError("the XrayGPT engine is not loaded")
        for inp in inputs:
            if inp.task not in TASKS:
                raise TaskNotSupported(
                    f"task '{inp.task}' is not available: XrayGPT writes reports and answers questions, it gives no boxes"
                )
        results = []
        with self._lock, torch.inference_mode():
            for inp in inputs:
                question = self._question(inp)
                t0 = time.perf_counter()
                pixels = normalize(resized_rgb(inp.image.pixels8(), self.cfg.vision.image_size))[None]
                try:
                    img = self.model.encode_images(pixels)[0]
                    t1 = time.perf_counter()
                    g = generate(
                        self.model.llm,
                        self._embed(question, img),
                        int(inp.max_new_tokens or DEMO_MAX_NEW_TOKENS),
                        self.stops,
                        self.tokenizer.eos_id,
                        temperature=float(inp.temperature or 0.0),
                        should_stop=stop.should_stop,
                        seed=self.s.seed,
                    )
                except torch.cuda.OutOfMemoryError as e:
                    raise EngineError(f"GPU out of memory: {e}") from e
                stop.check()
                answer = postprocess(self.tokenizer.decode(g.ids))
                warnings = []
                if g.stopped == "length":
                    warnings.append(f"answer cut at max_new_tokens={inp.max_new_tokens or DEMO_MAX_NEW_TOKENS}")
                results.append(
                    AnalysisResult(
                        text=answer,
                        raw_output=self.tokenizer.decode(g.ids),
                        warnings=warnings,
                        timings_ms={
                            "vision": (t1 - t0) * 1000,
                            "generate": g.prefill_and_decode_s * 1000,
                            "new_tokens": float(len(g.ids)),
                            "prompt_tokens": float(g.prompt_tokens),
                        },
                    )
                )
        return results
