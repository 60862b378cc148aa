"""The XrayGPT model: EVA ViT-g (224 px) -> ln_vision -> Q-Former (32 queries) -> llama_proj -> Vicuna (LLaMA).

The EVA tower and ``ln_vision`` are MiniGPT-Med's (``backend.minigpt``: the same network and file); the Q-Former is
transformers' ``Blip2QFormerModel`` with the text path off, which is the LAVIS ``BertModel`` query path layer for
layer (``weights.QFORMER_KEY_MAP`` renames the BLIP-2 checkpoint's keys). Loading is in ``weights.py``, the
conversation template in ``template.py``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from backend.minigpt.eva_vit import EvaViT
from backend.minigpt.model import LnVision

from .config import XrayGPTConfig


class XrayGPT(nn.Module):
    llm: Any

    def __init__(self, cfg: XrayGPTConfig, llm: Any, hidden_size: int):
        from transformers import Blip2QFormerModel

        super().__init__()
        self.cfg = cfg
        self.visual_encoder = EvaViT(cfg.vision)
        self.ln_vision = LnVision(cfg.vision.width, eps=cfg.ln_vision_eps)
        self.qformer = Blip2QFormerModel(cfg.qformer_config())
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.qformer.num_query_tokens, cfg.qformer.hidden_size))
        self.llama_proj = nn.Linear(cfg.qformer.hidden_size, hidden_size)
        self.llm = llm
        self.vision_autocast: torch.dtype | None = None  # CUDA: the original runs the image path under fp16 autocast

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    def _autocast(self):
        if self.vision_autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.vision_autocast)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,224,224] normalised pixels -> [B, 32, hidden] in the LLM's embedding dtype (``encode_img``)."""
        emb_dtype = self.llm.get_input_embeddings().weight.dtype
        with self._autocast():
            feats = self.ln_vision(self.visual_encoder(pixels.to(self.device)))  # CLS kept, as the original
            qdtype = self.query_tokens.dtype
            queries = self.query_tokens.expand(feats.shape[0], -1, -1)
            out = self.qformer(
                query_embeds=queries,
                encoder_hidden_states=feats.to(qdtype) if self.vision_autocast is None else feats,
                encoder_attention_mask=torch.ones(feats.shape[:-1], dtype=torch.long, device=feats.device),
            ).last_hidden_state
            if self.vision_autocast is None:
                out = out.to(self.llama_proj.weight.dtype)
            tokens = self.llama_proj(out)
        return tokens.to(emb_dtype)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids.to(self.device))
