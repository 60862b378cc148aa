"""``--engine llava --family llava_rad``: LLaVA-Rad (microsoft/LLaVA-Rad) from the files its authors release.

Tasks: ``report`` (the evaluation's findings prompt, ``Provide a description of the findings in the radiology
image.``; a question sent with a report is the reason for the exam, which the training data's second prompt form
takes) and ``vqa`` (the question as typed). LLaVA-Rad emits no boxes: detect/ground/identify answer 501. A
request's ``prompt`` replaces the question text verbatim. Image: RGB, open_clip's shortest-side bicubic resize and
centre crop to the tower's size, the tower's mean/std (``backend/llava/preprocess.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from MiniGPTMedSlicerLib.protocol import REPORT, VQA

from ..setting_error import SettingError
from ..settings import LlavaSettings
from .base import AnalysisInput, AnalysisResult, Engine, EngineError, EngineInfo, StopToken, TaskNotSupported

log = logging.getLogger("minigptmed.llava")

TASKS = (REPORT.id, VQA.id)
FAMILIES = ("llava_rad",)


class LlavaEngine(Engine):
    def __init__(self, settings: LlavaSettings):
        self.s = settings
        self.model: Any = None
        self.tokenizer: Any = None
        self.cfg: Any = None
        self.report: Any = None
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
        from backend.llava.config import LlavaConfigError, read_config
        from backend.llava.weights import load_llava_rad
        from backend.minigpt.tokenization import MiniGPTTokenizer
        from backend.minigpt.weights import LoadOptions, WeightsError

        if self.s.family not in FAMILIES:
            raise SettingError(
                "{family} " + f"{self.s.family!r} is not a LLaVA family; --engine llava serves: {', '.join(FAMILIES)}",
                "family",
            )
        missing = [k for k in ("model", "llama") if not getattr(self.s, k)]
        if missing:
            raise SettingError(
                "the LLaVA engine needs "
                + ", ".join("{" + k + "}" for k in missing)
                + " (the LLaVA-Rad folder and its base LLM, lmsys/vicuna-7b-v1.5)",
                *missing,
            )
        if self.s.quantize != "none":
            raise SettingError(
                "{quantize} is not supported by the LLaVA engine (the LoRA is merged at load)", "quantize"
            )
        self.device, self.dtype = self._resolve()
        try:
            self.cfg = read_config(str(self.s.model), self.s.model_config)
            opts = LoadOptions(device=self.device, dtype=self.dtype, trust_checkpoints=self.s.trust_checkpoints)
            self.model, self.report = load_llava_rad(str(self.s.model), str(self.s.llama), self.cfg, opts)
            self.tokenizer = MiniGPTTokenizer(str(self.s.llama))
        except (LlavaConfigError, WeightsError, FileNotFoundError) as e:
            raise EngineError(str(e)) from e
        log.info(
            "LLaVA-Rad loaded in %.1f s on %s (%s): %d image tokens, tower %s at %d px; ignored: %s",
            self.report.seconds,
            self.device,
            str(self.dtype).replace("torch.", ""),
            self.cfg.image_tokens,
            self.cfg.tower_name,
            self.cfg.trunk.image_size,
            {k: len(v) for k, v in self.report.ignored.items()},
        )

    def info(self) -> EngineInfo:
        dt = str(self.dtype).replace("torch.", "") if self.dtype is not None else "?"
        name = self.cfg.name if self.cfg else "LLaVA-Rad"
        return EngineInfo(engine="llava", model=name, device=f"{self.device} ({dt})", tasks=TASKS, max_batch=1)

    def close(self) -> None:
        self.model = None

    @staticmethod
    def question(inp: AnalysisInput) -> str:
        from backend.llava.template import report_question

        if inp.prompt:
            return inp.prompt
        if inp.task == REPORT.id:
            return report_question(inp.question)
        q = (inp.question or "").strip()
        if not q:
            raise TaskNotSupported("vqa needs a question")
        return q

    def prompt_embeds(self, question: str, image_emb):
        from backend.llava.template import build_prompt, prompt_chunks
        from backend.prompt_embeds import splice_image

        chunks = prompt_chunks(self.tokenizer.sp, build_prompt(question), self.tokenizer.bos_id)
        dtype = self.model.llm.get_input_embeddings().weight.dtype
        return splice_image(self.model.embed_tokens, chunks, image_emb, dtype)

    def analyze_batch(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        import torch

        from backend.llava.generate import EVAL_MAX_NEW_TOKENS, generate
        from backend.llava.preprocess import preprocess
        from backend.llava.template import postprocess

        if self.model is None:
            raise EngineError("the LLaVA engine is not loaded")
        for inp in inputs:
            if inp.task not in TASKS:
                raise TaskNotSupported(
                    f"task '{inp.task}' is not available: LLaVA-Rad writes findings and answers questions, "
                    "it gives no boxes"
                )
        results = []
        with self._lock, torch.inference_mode():
            for inp in inputs:
                question = self.question(inp)
                t0 = time.perf_counter()
                pixels = preprocess(inp.image.rgb8(), self.cfg.trunk.image_size, self.cfg.mean, self.cfg.std)[None]
                limit = int(inp.max_new_tokens or EVAL_MAX_NEW_TOKENS)
                try:
                    img = self.model.encode_images(pixels.to(self.dtype))[0]
                    t1 = time.perf_counter()
                    g = generate(
                        self.model.llm,
                        self.prompt_embeds(question, img),
                        limit,
                        self.tokenizer.eos_id,
                        temperature=float(inp.temperature or 0.0),
                        should_stop=stop.should_stop,
                        seed=self.s.seed,
                    )
                except torch.cuda.OutOfMemoryError as e:
                    raise EngineError(f"GPU out of memory: {e}") from e
                stop.check()
                raw = self.tokenizer.decode(g.ids)
                warnings = [f"answer cut at max_new_tokens={limit}"] if g.stopped == "length" else []
                results.append(
                    AnalysisResult(
                        text=postprocess(raw),
                        raw_output=raw,
                        warnings=warnings,
                        timings_ms={
                            "vision": (t1 - t0) * 1000,
                            "generate": g.seconds * 1000,
                            "new_tokens": float(len(g.ids)),
                            "prompt_tokens": float(g.prompt_tokens),
                        },
                    )
                )
        return results
