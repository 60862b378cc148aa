"""``minigptmed-backend convert``: the three original files -> one safetensors folder that loads fast.

Layout of the output folder::

    minigptmed_config.json   model config, LoRA mode, sources
    vision.safetensors       visual_encoder.* (39 blocks, pos_embed already interpolated, fp32) + llama_proj.*
    llm/                     LlamaForCausalLM.save_pretrained (LoRA merged unless --keep-lora) + tokenizer files
    lora.safetensors         only with --keep-lora: layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.weight

Vision and projector tensors are written exactly as the original loader would hold them, so the converted folder
gives the same outputs as the original files at the same device and dtype.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from ..torch_utils import DTYPES
from .config import MiniGPTMedConfig
from .model import LoraLinear, merge_lora
from .weights import (
    CONVERTED_MARKER,
    LoadOptions,
    _load_llm,
    attach_lora,
    read_original_parts,
)

log = logging.getLogger("minigptmed.convert")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def folder_dtype(llama_cfg: dict) -> torch.dtype:
    name = llama_cfg.get("torch_dtype") or llama_cfg.get("dtype") or "float32"
    return DTYPES.get(str(name), torch.float32)


def convert(
    eva: str,
    llama: str,
    checkpoint: str,
    out: str | Path,
    cfg: MiniGPTMedConfig,
    keep_lora: bool = False,
    dtype: torch.dtype | None = None,
    trust_checkpoints: bool = False,
) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    llama_cfg, parts, vision_sd, eva_ignored = read_original_parts(eva, llama, checkpoint, cfg, trust_checkpoints)
    dtype = dtype or folder_dtype(llama_cfg)
    llm = _load_llm(llama, LoadOptions(device="cpu", dtype=dtype))
    attach_lora(llm, cfg, parts.lora, dtype)
    if keep_lora:
        for layer in llm.model.layers:  # unwrap: the base weights go to llm/, the adapters to lora.safetensors
            for name, mod in list(layer.self_attn.named_children()):
                if isinstance(mod, LoraLinear):
                    setattr(layer.self_attn, name, mod.base)
    else:
        merge_lora(llm)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    llm.save_pretrained(str(out / "llm"), safe_serialization=True)
    for f in TOKENIZER_FILES:
        if (Path(llama) / f).is_file():
            shutil.copy2(Path(llama) / f, out / "llm" / f)
    tensors = {f"visual_encoder.{k}": v.contiguous() for k, v in vision_sd.items()}
    tensors.update({f"llama_proj.{k}": v.contiguous() for k, v in parts.proj.items()})
    save_file(tensors, str(out / "vision.safetensors"))
    if keep_lora:
        save_file({k: v.contiguous() for k, v in parts.lora.items()}, str(out / "lora.safetensors"))
    elif (out / "lora.safetensors").exists():
        (out / "lora.safetensors").unlink()
    meta = {
        "format": "minigptmed-converted",
        "version": 1,
        "model_config": cfg.to_dict(),
        "lora": "separate" if keep_lora else "merged",
        "llm_dtype": str(dtype).replace("torch.", ""),
        "sources": {"eva": str(eva), "llama": str(llama), "checkpoint": str(checkpoint)},
        "ignored": {"eva": len(eva_ignored), "checkpoint": len(parts.ignored)},
    }
    (out / CONVERTED_MARKER).write_text(json.dumps(meta, indent=2))
    return {"seconds": time.perf_counter() - t0, "out": str(out), **meta}
