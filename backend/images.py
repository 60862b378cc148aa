"""Decode request images safely: base64 -> PNG/JPEG -> numpy, with limits checked before pixels are decoded."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np

from .engines.base import DecodedImage
from .errors import ApiError


@dataclass(frozen=True)
class ImageLimits:
    max_side: int = 8192
    max_pixels: int = 40_000_000
    min_side: int = 1


def decode_base64(data: str, field: str = "image") -> bytes:
    if not data:
        raise ApiError("bad_image", f"{field} is empty: send a base64-encoded PNG or JPEG")
    s = data.strip()
    if s.startswith("data:"):  # tolerate data URIs
        _, _, s = s.partition(",")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError("bad_image", f"{field} is not valid base64") from None
    if not raw:
        raise ApiError("bad_image", f"{field} decodes to an empty file")
    return raw


def decode_image(raw: bytes, limits: ImageLimits) -> DecodedImage:
    from PIL import Image, UnidentifiedImageError

    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        fmt = "PNG"
    elif raw[:3] == b"\xff\xd8\xff":
        fmt = "JPEG"
    else:
        raise ApiError("bad_image", "image is neither PNG nor JPEG (unrecognised file signature)")
    dims = _header_size(raw, fmt)
    if dims is not None:
        _check_size(*dims, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw), formats=[fmt])
            w, h = im.size  # header only: no pixels decoded yet
    except Image.DecompressionBombError:
        raise ApiError("too_large", "image has too many pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise ApiError("bad_image", f"cannot read the {fmt} header: {_short(e)}") from None
    _check_size(w, h, limits)
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError("bad_image", f"the {fmt} data is truncated or corrupt: {_short(e)}") from None
    return DecodedImage(array=_to_array(im), format=fmt)


def _check_size(w: int, h: int, limits: ImageLimits) -> None:
    if w < limits.min_side or h < limits.min_side:
        raise ApiError("bad_image", f"image is {w}x{h} pixels: it must be at least {limits.min_side}x{limits.min_side}")
    if w > limits.max_side or h > limits.max_side or w * h > limits.max_pixels:
        raise ApiError(
            "too_large",
            f"image is {w}x{h} pixels; the limit is {limits.max_side} per side and {limits.max_pixels:,} pixels in all",
        )


def _header_size(raw: bytes, fmt: str) -> tuple[int, int] | None:
    """Width and height read from the file header alone (None when the header is not understood)."""
    if fmt == "PNG":
        if len(raw) >= 24 and raw[12:16] == b"IHDR":
            return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
        return None
    i = 2  # JPEG: walk the markers to the first start-of-frame
    while i + 9 < len(raw):
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(raw[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            return int.from_bytes(raw[i + 7 : i + 9], "big"), int.from_bytes(raw[i + 5 : i + 7], "big")
        i += 2 + length
    return None


def _to_array(im) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, dtype=np.uint16).copy()
    if mode == "I":  # 16-bit PNGs often open as 32-bit int
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ApiError("bad_image", "32-bit integer images are not supported: send 8-bit or 16-bit")
        return a.astype(np.uint16)
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode == "1":
        return (np.asarray(im, dtype=np.uint8) * 255).astype(np.uint8)
    if mode in ("LA",):
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    raise ApiError("bad_image", f"unsupported image mode {mode}: send 8-bit gray/RGB or 16-bit gray")


def _short(e: Exception) -> str:
    s = str(e) or type(e).__name__
    return s[:200]
