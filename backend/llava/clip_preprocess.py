"""The image path of a LLaVA-1.5 model with a CLIP tower (``haotian-liu/LLaVA`` @ 3e337ad ``llava/mm_utils.py``
``process_images``), with PIL and numpy only:

* ``image_aspect_ratio == "pad"``: ``expand2square`` first — the image centred on a square canvas of its longer side
  (offset ``(long - short) // 2``), filled with the processor's mean colour ``tuple(int(x * 255) for x in
  image_mean)`` ((122, 116, 104) for CLIP's mean), so nothing of a non-square slice is cropped away;
* then transformers' ``CLIPImageProcessor`` as ``openai/clip-vit-large-patch14-336`` configures it: RGB, the
  shorter side resized to ``size`` (bicubic; the longer ``int(size * long / short)``), centre crop
  (offsets ``(h - size) // 2``), ``/ 255``, ``(x - mean) / std``.

``pad_offsets`` gives where the original image lies in the square, for mapping back if ever needed.
"""

from __future__ import annotations

import numpy as np
import torch

from backend.minigpt.preprocess import to_rgb_pil

from .preprocess import normalize


def pad_colour(mean) -> tuple[int, int, int]:
    return tuple(int(x * 255) for x in mean)  # type: ignore[return-value]


def pad_offsets(width: int, height: int) -> tuple[int, int, int]:
    """(side, left, top) of the image inside ``expand2square``'s canvas."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def expand2square(pil, colour):
    from PIL import Image

    w, h = pil.size
    if w == h:
        return pil
    side, left, top = pad_offsets(w, h)
    out = Image.new(pil.mode, (side, side), colour)
    out.paste(pil, (left, top))
    return out


def resize_crop(pil, size: int) -> np.ndarray:
    from PIL import Image

    w, h = pil.size
    short, long = (w, h) if w <= h else (h, w)
    nl = int(size * long / short)
    nw, nh = (size, nl) if w <= h else (nl, size)
    if (nw, nh) != (w, h):
        pil = pil.resize((nw, nh), resample=Image.Resampling.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(pil, dtype=np.uint8)[top : top + size, left : left + size]


def preprocess(img, size: int, mean, std, aspect: str | None) -> torch.Tensor:
    """(H,W)/(H,W,3) uint8 or PIL -> [3, size, size] float32."""
    pil = to_rgb_pil(img)
    if aspect == "pad":
        pil = expand2square(pil, pad_colour(mean))
    return normalize(resize_crop(pil, size), mean, std)
