"""The vision tower's image transform: open_clip's ``image_transform(image_size, is_train=False)`` as
``create_model_from_pretrained`` builds it for a local checkpoint (open-clip-torch 2.23, the version
LLaVA-Rad's encoder README pins), with PIL and numpy only:

``Resize(image_size, BICUBIC)`` of the shorter side (the longer one ``int(size * long / short)``), ``CenterCrop``
(offsets ``int(round((h - size) / 2))``), RGB, ``ToTensor``, ``Normalize(mean, std)`` (the tower config's
``preprocess_cfg`` or OpenAI CLIP's). ``model_mimic_cxr.py`` calls this processor directly: no padding to a square
(``image_aspect_ratio`` is not applied), so the edges of a non-square image are cropped away.
"""

from __future__ import annotations

import numpy as np
import torch

from backend.minigpt.preprocess import to_rgb_pil


def resize_crop(img, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(size, size, 3) uint8 and the crop (left, top, width, height) in the resized image."""
    from PIL import Image

    pil = to_rgb_pil(img)
    w, h = pil.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        pil = pil.resize((nw, nh), resample=Image.Resampling.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    out = np.asarray(pil, dtype=np.uint8)[top : top + size, left : left + size]
    return out, (left, top, nw, nh)


def normalize(rgb: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def preprocess(img, size: int, mean, std) -> torch.Tensor:
    return normalize(resize_crop(img, size)[0], mean, std)
