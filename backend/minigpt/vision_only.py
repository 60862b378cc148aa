"""What the backend keeps when a vLLM server runs MiniGPT-Med's LLM (``--vllm URL``): EVA ViT-g, ln_vision, the
projector and the LLaMA token-embedding table, read strictly from the same files as the full model; the 32 decoder
layers are not loaded (vLLM has them, from the folder ``convert --for-vllm`` wrote).

The embedding table is the LLaMA folder's ``model.embed_tokens.weight`` (the LoRA touches only q/v projections, so
the original folder, a converted folder's ``llm/`` and the vLLM folder all hold the same table).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import MiniGPTMedConfig
from .model import MiniGPTMed
from .weights import (
    CONVERTED_MARKER,
    LoadOptions,
    LoadReport,
    WeightsError,
    _assemble,
    read_llama_config,
    read_original_parts,
    torch_load,
)

EMBED_KEY = "model.embed_tokens.weight"


class EmbeddingTableLLM(nn.Module):
    """Stands for the LLaMA where only ``get_input_embeddings`` is needed (the prompt-embeds path)."""

    def __init__(self, config: Any, weight: torch.Tensor):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding.from_pretrained(weight, freeze=True)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens


def load_embedding_table(
    folder: str | Path, dtype: torch.dtype, device: str, opts_trust: bool = False
) -> tuple[Any, torch.Tensor]:
    """(LlamaConfig, [vocab, hidden] table) from a Hugging Face LLaMA folder, reading only that one tensor."""
    from transformers import LlamaConfig

    folder = Path(folder)
    cfg_json = read_llama_config(folder)
    config = LlamaConfig.from_dict(cfg_json)
    weight = None
    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        shard = folder / single
        if (folder / index).is_file():
            wm = json.loads((folder / index).read_text()).get("weight_map", {})
            if EMBED_KEY not in wm:
                raise WeightsError(f"{folder}/{index}: no {EMBED_KEY} in the weight map")
            shard = folder / wm[EMBED_KEY]
        if not shard.is_file():
            continue
        if shard.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(shard), framework="pt") as f:
                if EMBED_KEY not in f.keys():
                    raise WeightsError(f"{shard}: no {EMBED_KEY}")
                weight = f.get_tensor(EMBED_KEY)
        else:
            sd = torch_load(shard, trust=opts_trust)
            if EMBED_KEY not in sd:
                raise WeightsError(f"{shard}: no {EMBED_KEY}")
            weight = sd[EMBED_KEY]
        break
    if weight is None:
        raise WeightsError(f"{folder}: no model.safetensors or pytorch_model.bin (with index) holding {EMBED_KEY}")
    want = (int(cfg_json["vocab_size"]), int(cfg_json["hidden_size"]))
    if tuple(weight.shape) != want:
        raise WeightsError(f"{folder}: {EMBED_KEY} has shape {tuple(weight.shape)}, config.json says {want}")
    return config, weight.to(device=device, dtype=dtype)


def _converted_vision(folder: Path) -> tuple[MiniGPTMedConfig, dict, dict]:
    from safetensors.torch import load_file

    from .eva_vit import EvaViT

    meta = json.loads((folder / CONVERTED_MARKER).read_text())
    cfg = MiniGPTMedConfig.from_dict(meta["model_config"])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in EvaViT(cfg.vision).state_dict().items()}
    vsd = load_file(str(folder / "vision.safetensors"))
    vision = {k[len("visual_encoder.") :]: v for k, v in vsd.items() if k.startswith("visual_encoder.")}
    proj = {k[len("llama_proj.") :]: v for k, v in vsd.items() if k.startswith("llama_proj.")}
    extra = set(vsd) - {f"visual_encoder.{k}" for k in vision} - {f"llama_proj.{k}" for k in proj}
    if extra or set(shapes) - set(vision) or set(proj) != {"weight", "bias"}:
        raise WeightsError(f"{folder}/vision.safetensors does not hold exactly the EVA ViT-g and projector tensors")
    return cfg, vision, proj


def load_vision_and_embeddings(
    opts: LoadOptions,
    *,
    eva: str | None = None,
    llama: str | None = None,
    checkpoint: str | None = None,
    converted: str | None = None,
    cfg: MiniGPTMedConfig | None = None,
) -> tuple[MiniGPTMed, MiniGPTMedConfig, LoadReport, Path]:
    """The model without its decoder layers. Returns (model, config, report, folder holding the tokenizer)."""
    t0 = time.perf_counter()
    if converted:
        folder = Path(converted)
        if not (folder / CONVERTED_MARKER).is_file():
            raise WeightsError(f"--converted {folder}: not a converted MiniGPT-Med folder")
        cfg, vision_sd, proj = _converted_vision(folder)
        llm_dir = folder / "llm"
        report = LoadReport(source="converted")
    else:
        missing = [f"--{k}" for k, v in (("eva", eva), ("llama", llama), ("checkpoint", checkpoint)) if not v]
        if missing:
            raise WeightsError(f"the MiniGPT-Med engine needs {', '.join(missing)} (or --converted)")
        cfg = cfg or MiniGPTMedConfig.real()
        _llama_cfg, parts, vision_sd, eva_ignored = read_original_parts(
            str(eva), str(llama), str(checkpoint), cfg, trust=opts.trust_checkpoints
        )
        proj = parts.proj
        llm_dir = Path(str(llama))
        report = LoadReport(source="original")
        report.ignored = {"eva": eva_ignored, "checkpoint": parts.ignored, "lora": sorted(parts.lora)}
    config, table = load_embedding_table(llm_dir, opts.dtype, opts.device, opts.trust_checkpoints)
    model = _assemble(cfg, EmbeddingTableLLM(config, table), vision_sd, proj, None, opts, report)
    report.loaded["embed_tokens"] = 1
    report.lora = "on the vLLM server (merged by convert --for-vllm)"
    report.seconds = time.perf_counter() - t0
    return model, cfg, report, llm_dir
