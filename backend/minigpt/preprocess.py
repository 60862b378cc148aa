"""``Blip2ImageEvalProcessor`` with PIL only: gray -> RGB, squash-resize to 448 (bicubic, no crop, aspect not
kept), to [0, 1], CLIP mean/std."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb_pil(img: Image.Image | np.ndarray) -> Image.Image:
    """PIL image or (H,W)/(H,W,3) uint8 array -> RGB PIL image (gray replicated, as convert('L') + paste into RGB)."""
    from PIL import Image

    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise ValueError("arrays must be uint8 (use DecodedImage.rgb8() for 16-bit images)")
        img = Image.fromarray(img)
    if img.mode != "RGB":
        img = (
            img.convert("L").convert("RGB")
            if img.mode in ("L", "I", "I;16", "F", "1", "P", "LA")
            else img.convert("RGB")
        )
    return img


def resized_rgb(img: Image.Image | np.ndarray, size: int = 448) -> np.ndarray:
    """(size, size, 3) uint8 after the bicubic squash-resize. A gray image is resized as one band and then
    replicated: the same bytes as resizing its RGB copy (PIL resamples every band alike; tested), in half the time."""
    from PIL import Image

    if isinstance(img, np.ndarray) and img.ndim == 2 and img.dtype == np.uint8:
        gray = Image.fromarray(img).resize((size, size), resample=Image.Resampling.BICUBIC)
        return np.repeat(np.asarray(gray, dtype=np.uint8)[:, :, None], 3, axis=2)
    pil = to_rgb_pil(img).resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)


def normalize(rgb: np.ndarray) -> torch.Tensor:
    """(S,S,3) uint8 -> torch float32 [3,S,S] (ToTensor + Normalize)."""
    import torch

    x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def preprocess(img: Image.Image | np.ndarray, size: int = 448) -> torch.Tensor:
    return normalize(resized_rgb(img, size))
