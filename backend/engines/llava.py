"""``--engine llava``: the LLaVA family from the files their authors release.

* ``--family llava_rad``: LLaVA-Rad (microsoft/LLaVA-Rad). Tasks: ``report`` (the evaluation's findings prompt,
  ``Provide a description of the findings in the radiology image.``; a question sent with a report is the reason for
  the exam, which the training data's second prompt form takes) and ``vqa`` (the question as typed). Image: RGB,
  open_clip's shortest-side bicubic resize and centre crop to the tower's size, the tower's mean/std
  (``backend/llava/preprocess.py``).
* ``--family bimedix2``: BiMediX2 (mbzuai-oryx/BiMediX2, a LLaVA++ LLaMA-3-V model on Llama 3.1): its ``conv_llama3``
  template with the earlier turns of the conversation, a CLIP tower through transformers' ``CLIPVisionModel``, the
  image padded to a square with CLIP's mean colour (``image_aspect_ratio: pad``); report (our wording: the authors
  publish no report prompt) and vqa (the question as typed, in English or Arabic). Answers stream.

Neither model emits boxes: detect/ground/identify answer 501. A request's ``prompt`` replaces the question text
verbatim.
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
from .text_stream import DeltaText

log = logging.getLogger("minigptmed.llava")

TASKS = (REPORT.id, VQA.id)
FAMILIES = ("llava_rad", "bimedix2")
#: BiMediX2's demo: max_new_tokens 1024 (bimedix_inference.py)
BIMEDIX2_MAX_NEW_TOKENS = 1024


class LlavaEngine(Engine):
    def __init__(self, settings: LlavaSettings):
        self.s = settings
        self.model: Any = None
        self.tokenizer: Any = None
        self.cfg: Any = None
        self.report: Any = None
        self.device = "cpu"
        self.dtype: Any = None
        self.stops: list[int] = []  # bimedix2: <|eot_id|> and the generation config's EOS ids
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
        from backend.minigpt.weights import LoadOptions, WeightsError

        from ..llava.config import LlavaConfigError

        if self.s.family not in FAMILIES:
            raise SettingError(
                "{family} " + f"{self.s.family!r} is not a LLaVA family; --engine llava serves: {', '.join(FAMILIES)}",
                "family",
            )
        needs = ("model",) if self.s.family == "bimedix2" else ("model", "llama")
        missing = [k for k in needs if not getattr(self.s, k)]
        if missing:
            what = (
                " (the BiMediX2 folder, e.g. MBZUAI/BiMediX2-8B)"
                if self.s.family == "bimedix2"
                else " (the LLaVA-Rad folder and its base LLM, lmsys/vicuna-7b-v1.5)"
            )
            raise SettingError(
                "the LLaVA engine needs " + ", ".join("{" + k + "}" for k in missing) + what,
                *missing,
            )
        if self.s.quantize != "none":
            raise SettingError(
                "{quantize} is not supported by the LLaVA engine (the model is served in one dtype)", "quantize"
            )
        self.device, self.dtype = self._resolve()
        opts = LoadOptions(device=self.device, dtype=self.dtype, trust_checkpoints=self.s.trust_checkpoints)
        try:
            if self.s.family == "bimedix2":
                self._load_bimedix2(opts)
            else:
                self._load_llava_rad(opts)
        except (LlavaConfigError, WeightsError, FileNotFoundError) as e:
            raise EngineError(str(e)) from e
        log.info(
            "%s loaded in %.1f s on %s (%s): %d image tokens, tower %s; ignored: %s",
            self.cfg.name,
            self.report.seconds,
            self.device,
            str(self.dtype).replace("torch.", ""),
            self.cfg.image_tokens,
            self.cfg.tower_name,
            {k: len(v) for k, v in self.report.ignored.items()},
        )

    def _load_llava_rad(self, opts) -> None:
        from backend.llava.bimedix2_config import is_bimedix2_folder
        from backend.llava.config import LlavaConfigError, read_config
        from backend.llava.weights import load_llava_rad
        from backend.minigpt.tokenization import MiniGPTTokenizer

        if is_bimedix2_folder(str(self.s.model)):
            raise LlavaConfigError(f"{self.s.model}: a llava_llama (BiMediX2) folder: use --family bimedix2")
        self.cfg = read_config(str(self.s.model), self.s.model_config)
        self.model, self.report = load_llava_rad(str(self.s.model), str(self.s.llama), self.cfg, opts)
        self.tokenizer = MiniGPTTokenizer(str(self.s.llama))

    def _load_bimedix2(self, opts) -> None:
        from transformers import PreTrainedTokenizerFast

        from backend.llava.bimedix2_config import read_bimedix2_config
        from backend.llava.bimedix2_template import stop_ids
        from backend.llava.bimedix2_weights import load_bimedix2
        from backend.llava.config import LlavaConfigError

        self.cfg = read_bimedix2_config(str(self.s.model), self.s.model_config, self.s.vision_tower)
        try:
            # the folder's tokenizer.json (Llama 3's tokenizer_config names PreTrainedTokenizerFast; AutoTokenizer
            # would read config.json first, whose llava_llama type transformers does not know)
            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(self.s.model), local_files_only=True)
        except (OSError, ValueError) as e:
            raise LlavaConfigError(f"{self.s.model}: cannot load its tokenizer: {str(e).splitlines()[0][:200]}") from e
        self.model, self.report = load_bimedix2(str(self.s.model), self.cfg, opts)
        self.stops = stop_ids(self.tokenizer, self.model.llm.generation_config.eos_token_id)

    def info(self) -> EngineInfo:
        dt = str(self.dtype).replace("torch.", "") if self.dtype is not None else "?"
        name = self.cfg.name if self.cfg else "LLaVA-Rad"
        return EngineInfo(engine="llava", model=name, device=f"{self.device} ({dt})", tasks=TASKS, max_batch=1)

    def close(self) -> None:
        self.model = None

    def question(self, inp: AnalysisInput) -> str:
        from backend.llava import bimedix2_template, template

        if inp.prompt:
            return inp.prompt
        if inp.task == REPORT.id:
            if self.s.family == "bimedix2":
                return bimedix2_template.report_question(inp.modality)
            return template.report_question(inp.question)
        q = (inp.question or "").strip()
        if not q:
            raise TaskNotSupported("vqa needs a question")
        return q

    def _chunks(self, inp: AnalysisInput, question: str) -> list[list[int]]:
        from backend.llava import bimedix2_template, template

        if self.s.family == "bimedix2":
            history = [(t.question or bimedix2_template.report_question(inp.modality), t.answer) for t in inp.history]
            return bimedix2_template.prompt_chunks(self.tokenizer, bimedix2_template.build_prompt(question, history))
        return template.prompt_chunks(self.tokenizer.sp, template.build_prompt(question), self.tokenizer.bos_id)

    def prompt_embeds(self, chunks: list[list[int]], image_emb):
        from backend.prompt_embeds import splice_image

        dtype = self.model.llm.get_input_embeddings().weight.dtype
        return splice_image(self.model.embed_tokens, chunks, image_emb, dtype)

    def _pixels(self, inp: AnalysisInput):
        if self.s.family == "bimedix2":
            from backend.llava.clip_preprocess import preprocess as clip_preprocess

            c = self.cfg
            return clip_preprocess(inp.image.rgb8(), c.image_size, c.mean, c.std, c.aspect)[None]
        from backend.llava.preprocess import preprocess

        return preprocess(inp.image.rgb8(), self.cfg.trunk.image_size, self.cfg.mean, self.cfg.std)[None]

    def _decode(self, ids: list[int]) -> str:
        from backend.llava import bimedix2_template, template

        if self.s.family == "bimedix2":
            return bimedix2_template.postprocess(self.tokenizer.decode(ids, skip_special_tokens=True))
        return template.postprocess(self.tokenizer.decode(ids))

    def analyze_batch(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        import torch

        from backend.llava.generate import EVAL_MAX_NEW_TOKENS, generate

        if self.model is None:
            raise EngineError("the LLaVA engine is not loaded")
        for inp in inputs:
            if inp.task not in TASKS:
                raise TaskNotSupported(
                    f"task '{inp.task}' is not available: {self.cfg.name} writes reports and answers questions, "
                    "it gives no boxes"
                )
        bimedix2 = self.s.family == "bimedix2"
        results = []
        with self._lock, torch.inference_mode():
            for inp in inputs:
                question = self.question(inp)
                chunks = self._chunks(inp, question)
                t0 = time.perf_counter()
                pixels = self._pixels(inp)
                limit = int(inp.max_new_tokens or (BIMEDIX2_MAX_NEW_TOKENS if bimedix2 else EVAL_MAX_NEW_TOKENS))
                if bimedix2:  # bimedix_inference.py: at most the context left after the prompt and the image
                    room = self.cfg.max_positions - sum(map(len, chunks)) - self.cfg.image_tokens
                    if room < 1:
                        raise TaskNotSupported(
                            f"the conversation is longer than {self.cfg.name}'s context "
                            f"({self.cfg.max_positions} positions): start a new one"
                        )
                    limit = min(limit, room)
                stream = DeltaText(inp.on_text) if inp.on_text is not None else None
                on_step = (lambda ids, s=stream: s.update(self._decode(ids))) if stream is not None else None
                try:
                    img = self.model.encode_images(pixels.to(self.dtype))[0]
                    t1 = time.perf_counter()
                    g = generate(
                        self.model.llm,
                        self.prompt_embeds(chunks, img),
                        limit,
                        self.stops if bimedix2 else self.tokenizer.eos_id,
                        temperature=float(inp.temperature or 0.0),
                        should_stop=stop.should_stop,
                        seed=self.s.seed,
                        on_step=on_step,
                        top_p=1.0 if bimedix2 else None,
                        top_k=50 if bimedix2 else None,
                    )
                except torch.cuda.OutOfMemoryError as e:
                    raise EngineError(f"GPU out of memory: {e}") from e
                stop.check()
                raw = (
                    self.tokenizer.decode(g.ids, skip_special_tokens=True) if bimedix2 else self.tokenizer.decode(g.ids)
                )
                text = self._decode(g.ids)
                if stream is not None:
                    stream.finish(text)
                warnings = [f"answer cut at max_new_tokens={limit}"] if g.stopped == "length" else []
                results.append(
                    AnalysisResult(
                        text=text,
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
