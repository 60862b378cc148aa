"""``minigptmed-backend convert --qformer ...``: XrayGPT's four original files -> one safetensors folder.

Layout (written to a temporary folder beside ``out`` and renamed into place: whole or not at all)::

    xraygpt_config.json   format marker, model config, sources, ignored-key counts
    vision.safetensors    visual_encoder.* (EVA, 39 blocks), ln_vision.*, query_tokens, qformer.* (Blip2QFormerModel
                          names, after QFORMER_KEY_MAP), llama_proj.*; all as loaded from the originals
    llm/                  the Vicuna folder: LlamaForCausalLM.save_pretrained + its tokenizer files

Loading it (``weights.load_converted``) reads only safetensors: no pickles, no key mapping.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from backend.minigpt.convert import TOKENIZER_FILES, folder_dtype
from backend.minigpt.weights import LoadOptions, WeightsError, _load_llm, read_llama_config

from .config import XrayGPTConfig
from .weights import CONVERTED_MARKER, read_original_parts


def convert(
    eva: str,
    qformer: str,
    llama: str,
    checkpoint: str,
    out: str | Path,
    cfg: XrayGPTConfig,
    dtype: torch.dtype | None = None,
    trust_checkpoints: bool = False,
) -> dict:
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise WeightsError(f"--out {out} exists and is not empty; choose a new folder")
    parts = read_original_parts(eva, qformer, llama, checkpoint, cfg, trust_checkpoints)
    dtype = dtype or folder_dtype(read_llama_config(llama))
    llm = _load_llm(llama, LoadOptions(device="cpu", dtype=dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        llm.save_pretrained(str(tmp / "llm"), safe_serialization=True)
        for f in TOKENIZER_FILES:
            if (Path(llama) / f).is_file():
                shutil.copy2(Path(llama) / f, tmp / "llm" / f)
        tensors = {f"visual_encoder.{k}": v.contiguous() for k, v in parts["vision"].items()}
        tensors.update({k: v.contiguous() for k, v in parts["qformer"].items()})
        tensors.update({f"llama_proj.{k}": v.contiguous() for k, v in parts["proj"].items()})
        save_file(tensors, str(tmp / "vision.safetensors"))
        meta = {
            "format": "xraygpt-converted",
            "version": 1,
            "model_config": cfg.to_dict(),
            "llm_dtype": str(dtype).replace("torch.", ""),
            "sources": {"eva": str(eva), "qformer": str(qformer), "llama": str(llama), "checkpoint": str(checkpoint)},
            "ignored": {k: len(v) for k, v in parts["ignored"].items()},
        }
        (tmp / CONVERTED_MARKER).write_text(json.dumps(meta, indent=2))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"seconds": time.perf_counter() - t0, "out": str(out), **meta}
