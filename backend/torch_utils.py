"""Device and dtype names -> torch objects, shared by the engines and the converter (no model code here)."""

from __future__ import annotations

import torch

from .setting_error import SettingError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str | None) -> str:
    """``auto`` (or empty): ``cuda`` when available, else ``cpu``. A CUDA device without CUDA is a setting error."""
    dev = name or "auto"
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError("{device} " + dev + ": CUDA is not available in this PyTorch build", "device")
    return dev


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A dtype name -> torch dtype; ``auto`` (or empty) -> None (the caller's default)."""
    if name in (None, "", "auto"):
        return None
    if name not in DTYPES:
        raise SettingError("{dtype} " + str(name) + ": choose float32, bfloat16, float16 or auto", "dtype")
    return DTYPES[name]
