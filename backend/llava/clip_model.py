"""BiMediX2's network (a LLaVA-1.5 model, ``haotian-liu/LLaVA`` @ 3e337ad): transformers' ``CLIPVisionModel`` run
with ``output_hidden_states`` as ``CLIPVisionTower`` runs it (``hidden_states[mm_vision_select_layer]``, the class
token dropped for ``"patch"``; the tower's ``post_layernorm`` is never on this path), the ``mm_projector``
(``build_vision_projector``: ``Linear, GELU, Linear`` for ``mlp2x_gelu``) and the LLM (transformers'
``LlamaForCausalLM``); the image features replace the ``<image>`` position of the prompt."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .bimedix2_config import Bimedix2Config
from .model import build_projector


def clip_vision_model(cfg: Bimedix2Config):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**cfg.vision)).eval()


class LlavaClip(nn.Module):
    llm: Any

    def __init__(self, cfg: Bimedix2Config, llm: Any):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = clip_vision_model(cfg)
        self.mm_projector = build_projector(cfg.projector_type, cfg.mm_hidden_size, cfg.hidden_size)
        self.llm = llm

    @property
    def device(self) -> torch.device:
        return next(self.mm_projector.parameters()).device

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] normalised pixels -> [B, image_tokens, hidden] (``encode_images``)."""
        dtype = next(self.mm_projector.parameters()).dtype
        out = self.vision_tower(pixels.to(device=self.device, dtype=dtype), output_hidden_states=True)
        h = out.hidden_states[self.cfg.select_layer]
        if self.cfg.select_feature == "patch":
            h = h[:, 1:]
        return self.mm_projector(h).to(self.llm.get_input_embeddings().weight.dtype)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids.to(self.device))
