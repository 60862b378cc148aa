"""Typed configuration of XrayGPT (mbzuai-oryx/XrayGPT: the MiniGPT-4 v1 architecture).

From ``xraygpt/models/mini_gpt4.py``, ``xraygpt/models/blip2.py`` and ``xraygpt/configs/models/xraygpt.yaml``
(@ d0baa6a):

* vision: EVA-CLIP ViT-g/14 (``create_eva_vit_g``, 39 blocks, width 1408) at **224 px** (16x16 patches + CLS, so
  ``eva_vit_g.pth``'s position table is used as it is), followed by ``ln_vision`` (LayerNorm 1408, eps 1e-5, weights
  from the BLIP-2 checkpoint);
* Q-Former: BERT-base (``bert-base-uncased`` config: 12 layers, hidden 768, 12 heads, MLP 3072, LayerNorm eps 1e-12,
  GELU) with cross-attention to the 257 image tokens in every second layer (``cross_attention_freq=2``), 32 learned
  query tokens; only the query path is kept (text FFN, word/position embeddings and the LM head removed);
* ``llama_proj``: Linear(768 -> LLM hidden) on the 32 query outputs = 32 image tokens for the LLM;
* LLM: Vicuna-7B v1 fine-tuned on radiology conversations (``Vicuna_Radiology_fp16``), a plain LLaMA folder.

A ``--model-config`` JSON file overrides parts (tiny test models)::

    {"vision": {"width": 32, "depth": 2, "heads": 4, "mlp_dim": 64},
     "qformer": {"hidden_size": 32, "num_layers": 2, "heads": 2, "intermediate_size": 64, "num_query_tokens": 4},
     "llm_hidden_size": 64}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.minigpt.config import VisionConfig


def _vision_224() -> VisionConfig:
    return VisionConfig(image_size=224)


@dataclass
class QFormerSettings:
    hidden_size: int = 768
    num_layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2
    num_query_tokens: int = 32
    layer_norm_eps: float = 1e-12


@dataclass
class XrayGPTConfig:
    vision: VisionConfig = field(default_factory=_vision_224)
    qformer: QFormerSettings = field(default_factory=QFormerSettings)
    ln_vision_eps: float = 1e-5
    llm_hidden_size: int | None = 4096  # Vicuna-7B; None: take it from the LLaMA folder
    name: str = "XrayGPT (MiniGPT-4 v1: EVA ViT-g/14 + Q-Former + Vicuna-7B radiology)"

    @property
    def image_tokens(self) -> int:
        return self.qformer.num_query_tokens

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> XrayGPTConfig:
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown XrayGPT model-config keys: {', '.join(sorted(unknown))}")
        vision = {"image_size": 224, **(d.pop("vision", {}) or {})}
        qf = d.pop("qformer", {}) or {}
        for part, keys, known in (("vision", vision, VisionConfig), ("qformer", qf, QFormerSettings)):
            bad = set(keys) - {f.name for f in dataclasses.fields(known)}
            if bad:
                raise ValueError(f"unknown XrayGPT model-config {part} keys: {', '.join(sorted(bad))}")
        cfg = cls(vision=VisionConfig(**vision), qformer=QFormerSettings(**qf), **d)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | Path | None) -> XrayGPTConfig:
        if not path:
            return cls()
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        v, q = self.vision, self.qformer
        if v.image_size % v.patch_size or v.width % v.heads:
            raise ValueError("vision: image_size must be a multiple of patch_size and width of heads")
        if q.hidden_size % q.heads:
            raise ValueError(f"qformer hidden_size {q.hidden_size} is not divisible by heads {q.heads}")

    def qformer_config(self):
        """The transformers ``Blip2QFormerConfig`` of this Q-Former (query path only)."""
        from transformers import Blip2QFormerConfig

        q = self.qformer
        return Blip2QFormerConfig(
            hidden_size=q.hidden_size,
            num_hidden_layers=q.num_layers,
            num_attention_heads=q.heads,
            intermediate_size=q.intermediate_size,
            hidden_act="gelu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            layer_norm_eps=q.layer_norm_eps,
            cross_attention_frequency=q.cross_attention_freq,
            encoder_hidden_size=self.vision.width,
            use_qformer_text_input=False,
        )
