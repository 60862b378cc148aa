"""The prompt of a MiniGPT-4-style or LLaVA-style model as input embeddings: the token segments between the image
placeholders embedded by the LLM's table, with the image's embeddings spliced in at each placeholder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def splice_image(
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    segments: Sequence[Sequence[int]],
    image_emb: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[L, H] embeddings of ``segments[0] <image> segments[1] ... <image> segments[-1]`` (an empty segment adds
    nothing), every part cast to ``dtype`` (the LLM's input dtype)."""
    parts = []
    for i, ids in enumerate(segments):
        if ids:
            parts.append(embed_tokens(torch.tensor(list(ids), dtype=torch.long)))
        if i < len(segments) - 1:
            parts.append(image_emb)
    return torch.cat([p.to(dtype) for p in parts], dim=0)
