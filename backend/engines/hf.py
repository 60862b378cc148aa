"""``--engine hf``: a transformers VLM from a local folder (MedGemma 1.5, Qwen2.5-VL, Qwen3-VL, or generic).

``AutoModelForImageTextToText`` + the family's processor, from local files only (nothing is downloaded). MedGemma:
images zero-padded to a square (the processor then resizes to its size, 896 px for the real model), no system
prompt, bf16 (Gemma 3 gives empty output in fp16); the processor's image processor runs on its own and the text side
is built here as Gemma3Processor builds it (``_gemma_text``, ``_collate``), so that its output can be cached. Qwen:
its own smart resize through the PIL image processor (Qwen's full processor needs torchvision), the image tokens
expanded here. The image processor's output is kept per image (LRU) for MedGemma and the Qwen families, not for
``generic`` (its processor expands the text and processes the image in one call). Boxes come back through the family
decoder in pixels of the image that was sent.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from MiniGPTMedSlicerLib.protocol import REPORT, TEXT_TASKS

from .. import families
from ..families import ImageGeometry
from ..lru import LRUStore
from ..setting_error import SettingError
from ..settings import HFSettings
from .base import AnalysisInput, AnalysisResult, Engine, EngineError, EngineInfo, StopToken, model_image
from .text_stream import DeltaText

log = logging.getLogger("minigptmed.hf")


class HFEngine(Engine):
    def __init__(self, settings: HFSettings):
        if not settings.model:
            raise SettingError("the hf engine needs {model} PATH (a local model folder)", "model")
        self.settings = settings
        self.model_dir = settings.model
        self.family = families.check_family(settings.family)
        self.quantize = settings.quantize
        self.default_max_tokens = settings.default_max_tokens
        self.max_batch = max(1, int(settings.max_batch))
        self.model: Any = None
        self.processor: Any = None  # Gemma3Processor / AutoProcessor
        self.tokenizer: Any = None
        self.image_processor: Any = None  # Qwen: the PIL image processor
        # MedGemma, Qwen: the image processor's output per image (pixel values; Qwen's grid), so a follow-up skips it
        self._cache: LRUStore[Any] = LRUStore(settings.cache_size, settings.cache_bytes)
        self.image_processor_calls = 0  # images run through the image processor (a cache hit does not count)
        self.device = "cpu"

    # -- loading ------------------------------------------------------------------------------

    def _dtype(self):
        import torch

        from ..torch_utils import parse_dtype

        dt = parse_dtype(self.settings.dtype)
        if dt is not None:
            if self.family == "medgemma" and dt == torch.float16:
                raise SettingError("MedGemma (Gemma 3) gives empty output in float16: use {dtype} bfloat16", "dtype")
            return dt
        if self.family == "medgemma":
            return torch.bfloat16
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32

    def load(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        from ..torch_utils import resolve_device

        if not os.path.isdir(self.model_dir):
            raise SettingError(
                "{model} " + self.model_dir + ": no such folder (the hf engine loads local folders only)", "model"
            )
        self.device = resolve_device(self.settings.device)
        kwargs = {"dtype": self._dtype(), "local_files_only": True}
        if self.quantize != "none":
            try:
                from transformers import BitsAndBytesConfig
            except ImportError:
                raise SettingError("{quantize} needs bitsandbytes: pip install bitsandbytes", "quantize") from None
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=self.quantize == "8bit",
                load_in_4bit=self.quantize == "4bit",
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
        t0 = time.perf_counter()
        try:
            if families.uses_qwen_processor(self.family):
                from transformers import AutoImageProcessor

                self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
                self.image_processor = AutoImageProcessor.from_pretrained(self.model_dir, local_files_only=True)
            else:
                from transformers import AutoProcessor

                self.processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
                self.tokenizer = getattr(self.processor, "tokenizer", None)
            self.model = AutoModelForImageTextToText.from_pretrained(self.model_dir, **kwargs).eval()
        except OSError as e:
            raise EngineError(
                f"cannot load the model folder {self.model_dir}: {str(e).splitlines()[0][:300]}"
            ) from None
        if self.quantize == "none":
            self.model.to(self.device)
        log.info(
            "hf engine: %s (%s) on %s in %.1f s", self.model_dir, self.family, self.device, time.perf_counter() - t0
        )

    def info(self) -> EngineInfo:
        name = os.path.basename(os.path.normpath(self.model_dir))
        return EngineInfo(
            engine="hf",
            model=f"{name} ({self.family})",
            device=self.device,
            tasks=families.supported_tasks(self.family),
            max_batch=self.max_batch,
        )

    # -- inference ----------------------------------------------------------------------------

    def analyze_batch(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        for inp in inputs:
            families.check_task(self.family, inp.task)
        results: list[AnalysisResult | None] = [None] * len(inputs)
        groups: dict[float, list[int]] = {}  # one generate() per sampling temperature, up to max_batch rows each
        for i, inp in enumerate(inputs):
            groups.setdefault(float(inp.temperature or 0.0), []).append(i)
        for idx in groups.values():
            for k in range(0, len(idx), self.max_batch):
                chunk = idx[k : k + self.max_batch]
                for i in chunk:
                    if inputs[i].is_cancelled():  # cancelled while it waited: its row is dropped before it runs
                        results[i] = AnalysisResult(text="", cancelled=True)
                chunk = [i for i in chunk if results[i] is None]
                if chunk:
                    for i, r in zip(chunk, self._generate([inputs[i] for i in chunk], stop), strict=True):
                        results[i] = r
        return [r for r in results if r is not None]

    def _caches_images(self) -> bool:
        return self.family == "medgemma" or families.uses_qwen_processor(self.family)

    def _process_image(self, img):
        """The image processor alone on one model image (MedGemma: with Gemma3Processor's image defaults)."""
        if self.family == "medgemma":
            kwargs = getattr(self.processor, "images_kwargs", {})
            return self.processor.image_processor(images=[img], return_tensors="pt", **kwargs)
        return self.image_processor(images=[img], return_tensors="pt")

    def _prepare(self, inp: AnalysisInput):
        """(prompt text, model image, geometry, image-processor output) for one input. The text has the image
        tokens expanded (MedGemma, Qwen) or the image placeholder for the processor (generic: no image-processor
        output, the processor runs on the image in ``_collate``)."""

        img = None
        g = ImageGeometry(width=inp.image.width, height=inp.image.height)
        im: Any = self._cache.get(inp.cache_key()) if self._caches_images() else None
        if im is None:
            img = model_image(self.family, inp)
            if self.family == "medgemma":
                img = families.pad_to_square(img, g)
            if self._caches_images():
                im = self._process_image(img)
                self.image_processor_calls += 1
                nbytes = sum(v.numel() * v.element_size() for v in im.values() if hasattr(v, "numel"))
                self._cache.put(inp.cache_key(), im, nbytes)
        if families.uses_qwen_processor(self.family):
            t, gh, gw = (int(v) for v in im["image_grid_thw"][0])
            patch = int(getattr(self.image_processor, "patch_size", 14))
            g.model_height, g.model_width = gh * patch, gw * patch
        prompt = inp.prompt or families.prompt_for(self.family, inp.task, inp.question, inp.region, g, inp.modality)
        messages = self.messages(inp, prompt, g)
        if families.uses_qwen_processor(self.family):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            merge = int(getattr(self.image_processor, "merge_size", 2))
            n = t * gh * gw // (merge * merge)
            text = text.replace("<|image_pad|>", "<|image_pad|>" * n, 1)
        else:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if self.family == "medgemma":
                text = self._gemma_text(text, im)
        return text, img, g, im

    def _gemma_text(self, text: str, im) -> str:
        """Gemma3Processor's text side for one image: its placeholder (the ``<start_of_image>`` the chat template
        wrote) replaced by the processor's own expansion (``full_image_sequence``: the boi token, the image soft
        tokens, the eoi token; with pan-and-scan crops, their sequences too)."""
        boi = self.processor.image_token
        if text.count(boi) != 1:  # as the processor's own check: one placeholder per image
            raise ValueError(f"the prompt holds {text.count(boi)} {boi} tokens for one image")
        return text.replace(boi, self.processor.replace_image_token(im, image_idx=0), 1)

    def messages(self, inp: AnalysisInput, prompt: str, g: ImageGeometry) -> list[dict]:
        """The chat messages for the model's own chat template: the earlier turns (the image in the first user
        message, each answer as the assistant's message), then the question."""
        turns = []
        for t in inp.history:
            q = t.question or families.prompt_for(self.family, REPORT.id, None, None, g, inp.modality)
            turns += [(q, t.answer)]
        out: list[dict] = []
        for k, (q, a) in enumerate([*turns, (prompt, None)]):
            content: list[dict] = [{"type": "image"}] if k == 0 else []
            out.append({"role": "user", "content": [*content, {"type": "text", "text": q}]})
            if a is not None:
                out.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
        return out

    def _collate(self, preps) -> dict:
        """Several prepared inputs -> one left-padded batch."""
        import torch

        texts = [p[0] for p in preps]
        if self.family == "medgemma":  # as Gemma3Processor.__call__: token_type_ids 1 on the image soft tokens
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
            types = self.processor.create_mm_token_type_ids(enc["input_ids"])
            return {
                **enc,
                "token_type_ids": torch.tensor(types, dtype=enc["input_ids"].dtype),
                "pixel_values": torch.cat([p[3]["pixel_values"] for p in preps]),
            }
        if families.uses_qwen_processor(self.family):
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
            return {
                **enc,
                "pixel_values": torch.cat([p[3]["pixel_values"] for p in preps]),
                "image_grid_thw": torch.cat([p[3]["image_grid_thw"] for p in preps]),
            }
        return dict(
            self.processor(
                text=texts, images=[[p[1]] for p in preps], return_tensors="pt", padding=True, padding_side="left"
            )
        )

    def _end_ids(self) -> list[int]:
        """The ids generate() finishes a row on: the folder's generation_config eos ids, else the tokenizer's."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not ids and self.tokenizer.eos_token_id is not None:
            ids = [int(self.tokenizer.eos_token_id)]
        return [int(i) for i in ids]

    def _generate(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        class _Stop(StoppingCriteria):  # the deadline, or every row of the batch cancelled
            def __call__(self, input_ids, scores, **kwargs):
                return stop.should_stop() or all(i.is_cancelled() for i in inputs)

        end_ids = self._end_ids()

        class _EndRows(LogitsProcessor):
            """A row that is cancelled, or past its own max_new_tokens, may only end next: transformers then finishes
            it (pad from there on) and generate() returns when every row has, as MiniGPT-Med's decode loop does."""

            def __call__(self, input_ids, scores):
                step = input_ids.shape[1] - prompt_len
                ending = [inp.is_cancelled() or step >= limit for inp, limit in zip(inputs, limits, strict=True)]
                if not any(ending):
                    return scores
                rows = torch.tensor(ending, device=scores.device)[:, None]
                forced = torch.full_like(scores, float("-inf"))
                forced[:, end_ids[0]] = 0.0
                return torch.where(rows, forced, scores)

        t0 = time.perf_counter()
        preps = [self._prepare(inp) for inp in inputs]
        model_inputs = self._collate(preps)
        dtype = next(self.model.parameters()).dtype
        batch = {
            k: (
                v.to(self.model.device, dtype=dtype)
                if k == "pixel_values" and v.is_floating_point()
                else v.to(self.model.device)
            )
            for k, v in model_inputs.items()
            if hasattr(v, "to")
        }
        limits = [inp.max_new_tokens or self.default_max_tokens for inp in inputs]
        temperature = inputs[0].temperature or 0.0
        prompt_len = int(batch["input_ids"].shape[1])
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max(limits),
            "do_sample": temperature > 0,
            "stopping_criteria": StoppingCriteriaList([_Stop()]),
        }
        if end_ids:
            gen_kwargs["eos_token_id"] = end_ids
        ends = {int(v) for v in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id) if v is not None}
        ends.update(end_ids)
        streams = {k: DeltaText(inp.on_text) for k, inp in enumerate(inputs) if inp.on_text is not None}
        processors: list[LogitsProcessor] = [_EndRows()] if end_ids else []
        if streams:  # every streaming row of the batch (transformers' own streamer takes batch 1 only)
            processors.append(_RowStreams(self.tokenizer, streams, inputs, limits, prompt_len, ends))
        if processors:
            gen_kwargs["logits_processor"] = LogitsProcessorList(processors)
        if temperature > 0:
            gen_kwargs["temperature"] = temperature
        else:  # the folder's generation_config may ask for sampling: greedy must win
            gen_kwargs.update(top_k=None, top_p=None, temperature=None)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**batch, **gen_kwargs)
        stop.check()
        t2 = time.perf_counter()
        results: list[AnalysisResult] = []
        mask = batch.get("attention_mask")
        for k, (row, inp, limit, (_text, _img, g, _im)) in enumerate(zip(out, inputs, limits, preps, strict=True)):
            if inp.is_cancelled():  # its row was ended at the step after the cancel; the others went on
                results.append(AnalysisResult(text="", cancelled=True))
                continue
            new = row[prompt_len:].tolist()[:limit]
            n = next((i for i, tid in enumerate(new) if tid in ends), len(new))
            raw = self.tokenizer.decode(new[:n], skip_special_tokens=True)
            if k in streams:
                streams[k].finish(raw)
            default_label = inp.question or families.default_detect_label(self.family, inp.modality)
            dec = families.decode_output(self.family, raw, g, default_label=default_label)
            if inp.task in TEXT_TASKS and self.family == "generic":
                dec.findings = []
            results.append(
                AnalysisResult(
                    text=dec.text,
                    findings=dec.findings,
                    raw_output=raw,
                    warnings=dec.warnings,
                    timings_ms={
                        "preprocess": (t1 - t0) * 1000,
                        "generate": (t2 - t1) * 1000,
                        "new_tokens": float(n),
                        "prompt_tokens": float(mask[k].sum()) if mask is not None else float(prompt_len),
                        "batch": float(len(inputs)),
                    },
                )
            )
        return results


class _RowStreams:
    """A logits processor that only reads: at each decode step, every streaming row's tokens so far (up to its first
    end token and its own limit) decoded and fed to its ``DeltaText`` (never half a UTF-8 character; special tokens skipped). It sees
    a step's token at the next step; the row's last piece comes with ``finish``. One host read per step, only when
    a row streams."""

    def __init__(self, tokenizer, streams: dict[int, DeltaText], inputs, limits, prompt_len: int, ends: set[int]):
        self.tokenizer, self.streams, self.inputs, self.limits = tokenizer, streams, inputs, limits
        self.prompt_len, self.ends = prompt_len, ends

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.prompt_len:
            rows = sorted(self.streams)
            new = input_ids[rows, self.prompt_len :].tolist()
            for k, ids in zip(rows, new, strict=True):
                if self.inputs[k].is_cancelled():
                    continue
                ids = ids[: self.limits[k]]  # as the answer is cut (a row past its limit may run on)
                n = next((i for i, t in enumerate(ids) if t in self.ends), len(ids))
                self.streams[k].update(self.tokenizer.decode(ids[:n], skip_special_tokens=True))
        return scores
