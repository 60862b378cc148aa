"""Typed configuration of the MiniGPT-Med model (MiniGPT-v2 architecture fine-tuned for radiology).

The vision tower and the projector are described here; the LLM's dimensions always come from the LLaMA folder's
``config.json`` (or the converted folder). ``MiniGPTMedConfig.real()`` is the released 7B model; a ``--model-config``
JSON file overrides parts of it (tiny test models; without ``llm_hidden_size`` the LLaMA folder's hidden size is
used, so a file with only the ``vision`` object works; the 7B check applies to the real preset)::

    {"vision": {"image_size": 448, "patch_size": 14, "width": 64, "depth": 2, "heads": 4, "mlp_dim": 128},
     "llm_hidden_size": 64, "lora": {"r": 8, "alpha": 16}}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class VisionConfig:
    """EVA-CLIP ViT-g/14 as BLIP-2 / MiniGPT-v2 build it (``create_eva_vit_g``)."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1408
    depth: int = 39  # EVA-CLIP-g has 40 blocks; the original builds 39 and ignores the checkpoint's 40th
    heads: int = 16
    mlp_dim: int = 6144  # int(1408 * 4.3637)
    norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass
class LoraSettings:
    r: int = 64
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass
class MiniGPTMedConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    tokens_per_group: int = 4  # 4 horizontally adjacent patch tokens concatenated -> one LLM token
    ln_vision_eps: float = 1e-5  # torch default; weight 1 / bias 0 (never trained, not in any file)
    llm_hidden_size: int | None = 4096  # what the checkpoint's llama_proj expects (None: take it from the checkpoint)
    name: str = "MiniGPT-Med (MiniGPT-v2: EVA ViT-g/14 + LLaMA-2-7B-chat + LoRA)"
    preset: str = "7b"

    @property
    def image_tokens(self) -> int:
        return self.vision.num_patches // self.tokens_per_group

    @property
    def proj_in(self) -> int:
        return self.vision.width * self.tokens_per_group

    @classmethod
    def real(cls) -> MiniGPTMedConfig:
        return cls()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MiniGPTMedConfig:
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown model-config keys: {', '.join(sorted(unknown))}")
        vision = d.pop("vision", {}) or {}
        lora = d.pop("lora", {}) or {}
        vis_unknown = set(vision) - {f.name for f in dataclasses.fields(VisionConfig)}
        if vis_unknown:
            raise ValueError(f"unknown model-config vision keys: {', '.join(sorted(vis_unknown))}")
        if "targets" in lora:
            lora["targets"] = tuple(lora["targets"])
        d.setdefault("llm_hidden_size", None)  # a custom config takes the LLM's size from the LLaMA folder
        cfg = cls(vision=VisionConfig(**vision), lora=LoraSettings(**lora), **d)
        if "preset" not in d:
            cfg.preset = "custom"
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | Path | None) -> MiniGPTMedConfig:
        if not path:
            return cls.real()
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora"]["targets"] = list(self.lora.targets)
        return d

    def validate(self) -> None:
        v = self.vision
        if v.image_size % v.patch_size:
            raise ValueError(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.width % v.heads:
            raise ValueError(f"vision width {v.width} is not divisible by heads {v.heads}")
        if v.num_patches % self.tokens_per_group:
            raise ValueError(f"{v.num_patches} patches cannot be grouped by {self.tokens_per_group}")
