"""LLaVA-Rad's network: the timm ViT trunk as its ``VisionTower`` runs it, the ``mm_projector``, and the LLM.

``llava/model/multimodal_encoder/open_clip_encoder/open_clip_encoder.py`` (@ 1fc4409) runs the open_clip model's
``visual.trunk`` (a timm ``VisionTransformer``) as ``patch_embed -> _pos_embed -> norm_pre -> blocks`` and collects
every block's output; the trunk's final ``norm`` and open_clip's ``visual.head`` are never applied.
``feature_select`` takes ``hidden_states[mm_vision_select_layer]`` (-2: the output of the last-but-one block) and,
for ``"patch"``, drops the class token. ``mm_projector`` is ``build_vision_projector``'s ``mlpNx_gelu``
(``Linear, GELU, Linear, ...``) or ``Linear``. Our modules use timm's parameter names (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``) so
the open_clip checkpoint loads without renaming (``weights.py``). The LLM is transformers' ``LlamaForCausalLM``;
the image features replace the ``<image>`` position of the prompt (``prepare_inputs_labels_for_multimodal``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import LlavaRadConfig, TrunkConfig


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, t: TrunkConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(t.width, eps=t.eps)
        self.attn = _Attention(t.width, t.heads)
        self.ls1: nn.Module = _LayerScale(t.width) if t.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(t.width, eps=t.eps)
        self.mlp = _Mlp(t.width, t.mlp_dim)
        self.ls2: nn.Module = _LayerScale(t.width) if t.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, t: TrunkConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, t.width, kernel_size=t.patch_size, stride=t.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTTrunk(nn.Module):
    """The timm trunk up to its blocks (no final norm: LLaVA-Rad's ``VisionTower`` never applies it)."""

    def __init__(self, t: TrunkConfig):
        super().__init__()
        self.cfg = t
        self.patch_embed = _PatchEmbed(t)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, t.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, t.grid**2 + 1, t.width))
        self.blocks = nn.ModuleList(_Block(t) for _ in range(t.depth))

    def hidden_state(self, pixels: torch.Tensor, index: int) -> torch.Tensor:
        """``hidden_states[index]`` of ``VisionTower.forward`` (0: after ``_pos_embed``/``norm_pre``; k: after
        block k), computing only the blocks needed."""
        x = self.patch_embed(pixels.to(self.patch_embed.proj.weight.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed
        for block in self.blocks[:index]:
            x = block(x)
        return x


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """LLaVA's ``build_vision_projector``: ``Linear`` for ``linear``, ``Linear, GELU, Linear, ...`` for
    ``mlpNx_gelu`` (LLaVA-Rad's and BiMediX2's)."""
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    mods: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(1, int(projector_type[len("mlp") : -len("x_gelu")])):
        mods += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*mods)


class LlavaRad(nn.Module):
    llm: Any

    def __init__(self, cfg: LlavaRadConfig, llm: Any):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = ViTTrunk(cfg.trunk)
        self.mm_projector = build_projector(cfg.projector_type, cfg.mm_hidden_size, cfg.hidden_size)
        self.llm = llm

    @property
    def device(self) -> torch.device:
        return self.vision_tower.pos_embed.device

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] normalised pixels -> [B, image_tokens, hidden] (``encode_images``)."""
        h = self.vision_tower.hidden_state(pixels.to(self.device), self.cfg.blocks_used)
        if self.cfg.select_feature == "patch":
            h = h[:, 1:]
        out = self.mm_projector(h.to(self.vision_tower.pos_embed.dtype))
        return out.to(self.llm.get_input_embeddings().weight.dtype)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids.to(self.device))
