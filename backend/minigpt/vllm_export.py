"""``minigptmed-backend convert --for-vllm OUT``: MiniGPT-Med's language model as a plain Hugging Face LLaMA folder.

vLLM serves LLaMA-2 natively; MiniGPT-Med's LLM is LLaMA-2-7B-chat plus a LoRA on ``q_proj``/``v_proj``. Merging the
LoRA (W' = W + alpha/r * B @ A, in fp32, as ``merge_lora``) gives a model vLLM loads like any LLaMA, and the
``minigptmed`` engine with ``--vllm URL`` sends it the embedding sequence (template, double BOS, 256 image embeddings)
as ``prompt_embeds`` (``backend.minigpt.vllm_client``). Layout of OUT::

    config.json                          the LLaMA config (model_type llama, the source folder's dtype)
    model*.safetensors (+ index)         LlamaForCausalLM.save_pretrained with the LoRA merged
    tokenizer.model, tokenizer_config.json, special_tokens_map.json, tokenizer.json   copied as the source has them
    generation_config.json               greedy: do_sample false (Llama-2-chat's own asks for sampling)

No vision weights go there: EVA ViT-g and the projector stay with the backend. The folder is written beside OUT and
renamed into place, so OUT is either complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .config import MiniGPTMedConfig
from .convert import TOKENIZER_FILES, folder_dtype
from .model import merge_lora
from .weights import (
    CONVERTED_MARKER,
    LoadOptions,
    WeightsError,
    _load_llm,
    attach_lora,
    check_llm_hidden,
    load_checkpoint,
    read_llama_config,
)

# generation_config keys that only concern sampling: dropped, so that greedy is the folder's default
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "typical_p", "repetition_penalty", "min_p", "num_beams")


def _greedy_generation_config(source: Path, llama_cfg: dict) -> dict:
    gc: dict = {}
    if (source / "generation_config.json").is_file():
        gc = json.loads((source / "generation_config.json").read_text())
    gc = {k: v for k, v in gc.items() if k not in SAMPLING_KEYS}
    gc["do_sample"] = False
    gc.setdefault("bos_token_id", llama_cfg.get("bos_token_id", 1))
    gc.setdefault("eos_token_id", llama_cfg.get("eos_token_id", 2))
    return gc


def export_for_vllm(
    out: str | Path,
    *,
    llama: str | Path | None = None,
    checkpoint: str | Path | None = None,
    converted: str | Path | None = None,
    cfg: MiniGPTMedConfig | None = None,
    dtype: torch.dtype | None = None,
    trust_checkpoints: bool = False,
) -> dict:
    """Write the LoRA-merged LLM of MiniGPT-Med to ``out`` from the LLaMA folder + checkpoint, or from a folder
    written by ``convert``. Returns a summary (seconds, dtype, tensors)."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WeightsError(f"{out} already exists and is not empty; choose a new folder")
    if converted:
        conv = Path(converted)
        if not (conv / CONVERTED_MARKER).is_file():
            raise WeightsError(f"--converted {conv}: not a converted MiniGPT-Med folder (no {CONVERTED_MARKER})")
        meta = json.loads((conv / CONVERTED_MARKER).read_text())
        cfg = MiniGPTMedConfig.from_dict(meta["model_config"])
        source = conv / "llm"
        lora = None
        if meta.get("lora") == "separate":
            from safetensors.torch import load_file

            lora = load_file(str(conv / "lora.safetensors"))
    else:
        if not llama or not checkpoint:
            missing = [n for n, v in (("--llama", llama), ("--checkpoint", checkpoint)) if not v]
            raise WeightsError(f"convert --for-vllm needs {' and '.join(missing)} (or --converted)")
        cfg = cfg or MiniGPTMedConfig.real()
        source = Path(llama)
    llama_cfg = read_llama_config(source)
    check_llm_hidden(llama_cfg, cfg.llm_hidden_size, source)
    if not converted:
        parts = load_checkpoint(
            checkpoint or "",
            cfg,
            int(llama_cfg["num_hidden_layers"]),
            int(llama_cfg["hidden_size"]),
            trust=trust_checkpoints,
        )
        lora = parts.lora
    dtype = dtype or folder_dtype(llama_cfg)
    llm = _load_llm(source, LoadOptions(device="cpu", dtype=dtype))
    merged = 0
    if lora:
        attach_lora(llm, cfg, lora, dtype)
        merged = merge_lora(llm)
    from transformers import GenerationConfig

    llm.generation_config = GenerationConfig.from_dict(_greedy_generation_config(source, llama_cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        llm.save_pretrained(str(tmp), safe_serialization=True)
        for f in TOKENIZER_FILES:
            if (source / f).is_file():
                shutil.copy2(source / f, tmp / f)
        if not (tmp / "tokenizer.model").is_file() and not (tmp / "tokenizer.json").is_file():
            raise WeightsError(f"{source}: no tokenizer.model or tokenizer.json to copy; vLLM needs the tokenizer")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "seconds": time.perf_counter() - t0,
        "out": str(out),
        "dtype": str(dtype).replace("torch.", ""),
        "lora_merged": merged,
        "tensors": len(llm.state_dict()),
    }
