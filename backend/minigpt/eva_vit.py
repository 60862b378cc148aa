"""EVA-CLIP ViT-g/14 as used by BLIP-2 and MiniGPT-v2 (inference only).

Parameter names match ``eva_vit_g.pth`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1,attn.{qkv,q_bias,v_bias,proj},norm2,mlp.{fc1,fc2}}``) so the original file loads key for key.
Pre-norm blocks, q/v biases only (k bias is zero), exact-erf GELU, no layer scale, no relative position bias,
no final norm: the output is the last block's hidden states including CLS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # row-major patch order


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, cfg.width * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        w = self.qkv.weight
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        if not torch.is_autocast_enabled(x.device.type):
            bias = bias.to(w.dtype)
            x = x.to(w.dtype)
        qkv = F.linear(x, w, bias).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as the original
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B, 1 + grid*grid, width]. Under autocast (CUDA fp16 as the original) parameters keep
        their own dtypes; otherwise everything runs in the patch-embedding weight's dtype."""
        mixed = torch.is_autocast_enabled(pixels.device.type)
        dtype = self.patch_embed.proj.weight.dtype
        x = self.patch_embed(pixels if mixed else pixels.to(dtype))
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        pos: torch.Tensor = self.pos_embed
        if not mixed:
            cls, pos = cls.to(dtype), pos.to(dtype)
        x = torch.cat([cls, x.to(cls.dtype) if mixed else x], dim=1) + pos
        for blk in self.blocks:
            x = blk(x)
        return x


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The original ``interpolate_pos_embed``: keep the CLS row, bicubic-resize the patch rows (fp32,
    align_corners=False) from the checkpoint's square grid to ``grid`` x ``grid``. The result is float32."""
    n_old = pos_embed.shape[1] - 1
    old = round(n_old**0.5)
    if old * old != n_old:
        raise ValueError(f"pos_embed has {n_old} patch rows, not a square grid")
    if old == grid:
        return pos_embed
    c = pos_embed.shape[-1]
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    patches = patches.float().reshape(1, old, old, c).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, c)
    return torch.cat([cls.float(), patches], dim=1)  # fp32, as the original's torch.cat type promotion gives
