"""The MiniGPT-Med model: EVA ViT-g -> ln_vision -> drop CLS -> 4-token concat -> llama_proj -> LLaMA-2-chat (+LoRA).

``MiniGPTMed`` holds the parts; loading lives in ``weights.py``, prompting in ``tokenization.py`` and decoding in
``generate.py``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import MiniGPTMedConfig
from .eva_vit import EvaViT


class LnVision(nn.LayerNorm):
    """The original's ``LayerNorm`` subclass: computes in fp32, returns the input dtype. weight 1, bias 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class LoraLinear(nn.Module):
    """peft-0.2.0-style LoRA: ``base(x) + lora_B(lora_A(x)) * scaling`` (dropout is inactive at inference)."""

    base: Any

    def __init__(self, base: nn.Module, r: int, alpha: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        in_f = int(getattr(base, "in_features"))  # noqa: B009
        out_f = int(getattr(base, "out_features"))  # noqa: B009
        dev = next(base.parameters()).device
        dtype = dtype or torch.float32
        self.lora_A = nn.Linear(in_f, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=dev, dtype=dtype)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        lora = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling
        return out + lora.to(out.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return (w.float() + delta.to(w.device)).to(w.dtype)


def llama_layers(llm: Any) -> Any:
    return llm.model.layers


def add_lora(llm: Any, cfg: MiniGPTMedConfig, dtype: torch.dtype | None = None) -> dict[str, LoraLinear]:
    """Wrap q_proj / v_proj of every decoder layer; returns {'layers.i.self_attn.q_proj': module}."""
    out = {}
    for i, layer in enumerate(llama_layers(llm)):
        for name in cfg.lora.targets:
            base = getattr(layer.self_attn, name)
            wrapped = LoraLinear(base, cfg.lora.r, cfg.lora.alpha, dtype)
            setattr(layer.self_attn, name, wrapped)
            out[f"layers.{i}.self_attn.{name}"] = wrapped
    return out


@torch.no_grad()
def merge_lora(llm: Any) -> int:
    """Fold every LoraLinear into its base weight (W' = W + scaling * B @ A, computed in fp32) and unwrap it."""
    n = 0
    for layer in llama_layers(llm):
        for name, mod in list(layer.self_attn.named_children()):
            if isinstance(mod, LoraLinear):
                mod.base.weight.copy_(mod.merged_weight())
                setattr(layer.self_attn, name, mod.base)
                n += 1
    return n


class MiniGPTMed(nn.Module):
    llm: Any

    def __init__(self, cfg: MiniGPTMedConfig, llm: Any, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = EvaViT(cfg.vision)
        self.ln_vision = LnVision(cfg.vision.width, eps=cfg.ln_vision_eps)
        self.llama_proj = nn.Linear(cfg.proj_in, hidden_size)
        self.llm = llm
        self.vision_autocast: torch.dtype | None = None  # set when the vision tower runs mixed (CUDA fp16/bf16)

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    def _autocast(self):
        if self.vision_autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.vision_autocast)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] normalised pixels -> [B, image_tokens, hidden] in the LLM's embedding dtype."""
        emb_dtype = self.llm.get_input_embeddings().weight.dtype
        with self._autocast():
            feats = self.ln_vision(self.visual_encoder(pixels.to(self.device)))[:, 1:, :]
            b, n, c = feats.shape
            g = self.cfg.tokens_per_group
            feats = feats.reshape(b, n // g, c * g)  # group k = patch tokens g*k .. g*k+g-1 (a horizontal strip)
            if self.vision_autocast is None:
                feats = feats.to(self.llama_proj.weight.dtype)
            out = self.llama_proj(feats)
        return out.to(emb_dtype)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids.to(self.device))
