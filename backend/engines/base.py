"""The engine interface: load, describe itself, analyze a batch.

An engine sees decoded images and returns text plus findings in pixels of the image it was given.
It never sees HTTP, RAS or DICOM. The service (``backend.service``) validates requests, decodes
images, sanitises engine output (clipping, dropping invalid boxes) and enforces time limits.
"""

from __future__ import annotations

import hashlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from MiniGPTMedSlicerLib.protocol import Finding

if TYPE_CHECKING:
    from PIL import Image


class TaskNotSupported(Exception):
    """The engine cannot do this task (HTTP 501)."""


class EngineError(Exception):
    """The engine failed on a valid request (HTTP 503), e.g. GPU out of memory."""


class EngineCancelled(Exception):
    """Generation stopped because the request's deadline passed or the client went away."""


@dataclass
class StopToken:
    """Checked by engines between expensive steps (e.g. every decoded token)."""

    deadline: float | None = None  # time.monotonic() value
    event: threading.Event = field(default_factory=threading.Event)

    def should_stop(self) -> bool:
        return self.event.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)

    def check(self) -> None:
        if self.should_stop():
            raise EngineCancelled("stopped: time limit reached or request cancelled")


@dataclass
class EngineInfo:
    engine: str  # e.g. "builtin", "minigptmed", "hf", "openai"
    model: str  # model id shown to the user
    device: str
    tasks: tuple[str, ...]
    max_batch: int = 1


@dataclass
class DecodedImage:
    """A decoded request image: ``array`` is (H, W) uint8/uint16 or (H, W, 3) uint8, top row first."""

    array: np.ndarray
    format: str  # "PNG" / "JPEG"

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    def gray_float(self) -> np.ndarray:
        """Intensities as float32 (H, W); RGB is averaged (medical slices are gray)."""
        a = self.array.astype(np.float32)
        return a.mean(axis=2) if a.ndim == 3 else a

    def pixels8(self) -> np.ndarray:
        """uint8, (H, W) for a gray image, (H, W, 3) for RGB. 16-bit gray is mapped min..max to 0..255 (a client
        that cares about window/level sends the windowed 8-bit image it displays)."""
        a = self.array
        if a.dtype == np.uint16:
            lo, hi = float(a.min()), float(a.max())
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
            a = np.clip((a.astype(np.float32) - lo) * scale + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(a)

    def rgb8(self) -> np.ndarray:
        """(H, W, 3) uint8 for VLMs: ``pixels8`` with gray replicated."""
        a = self.pixels8()
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2)) if a.ndim == 2 else a

    def content_id(self) -> str:
        """The image's id on the wire (``image_id``): a SHA-256 of its decoded pixels, shape and type."""
        a = np.ascontiguousarray(self.array)
        h = hashlib.sha256(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.tobytes())
        return h.hexdigest()

    def pil_rgb(self) -> Image.Image:
        from PIL import Image

        return Image.fromarray(self.rgb8(), mode="RGB")


@dataclass(frozen=True)
class Turn:
    """An earlier turn of the conversation about the same image: the task asked, the question (None for tasks
    without one) and the model's answer as it wrote it (the response's ``raw_output``)."""

    task: str
    question: str | None
    answer: str


TextCallback = Callable[[str], None]


@dataclass
class ScalarValues:
    """The slice's scalar values from ``AnalyzeRequest.values``, decoded: ``array`` (H, W) float32 in ``unit`` ("HU"
    on CT, "raw" otherwise), on exactly the image's pixel grid; the volume's range when the client sent it."""

    array: np.ndarray
    unit: str
    volume_min: float | None = None
    volume_max: float | None = None


@dataclass
class AnalysisInput:
    task: str
    image: DecodedImage
    question: str | None = None
    region: tuple[float, float, float, float] | None = None  # pixels, validated inside the image
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, col)
    modality: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    prompt: str | None = None
    values: ScalarValues | None = None

    history: tuple[Turn, ...] = ()  # earlier turns, oldest first
    image_id: str | None = None  # DecodedImage.content_id(): the key of the engines' per-image caches
    on_text: TextCallback | None = None  # streaming: called with each new piece of the answer as it is decoded
    cancelled: threading.Event | None = None  # set when this one request is cancelled (its batch row is dropped)

    @property
    def hu(self) -> np.ndarray | None:
        """Hounsfield units of the slice when the client sent CT values, else None."""
        return self.values.array if self.values is not None and self.values.unit == "HU" else None

    def cache_key(self) -> str:
        if self.image_id is None:
            self.image_id = self.image.content_id()
        return self.image_id

    def is_cancelled(self) -> bool:
        return self.cancelled is not None and self.cancelled.is_set()


@dataclass
class AnalysisResult:
    text: str
    findings: list[Finding] = field(default_factory=list)
    raw_output: str = ""
    warnings: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    cancelled: bool = False  # the request was cancelled while its batch ran; the rest of the result is empty


class Engine(ABC):
    """Base class of every engine. Constructors only store configuration; heavy work happens in ``load``."""

    @abstractmethod
    def load(self) -> None:
        """Load weights / connect. Called once, before the server accepts requests."""

    @abstractmethod
    def info(self) -> EngineInfo: ...

    @abstractmethod
    def analyze_batch(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        """Analyze several inputs (one result each, same order). Raise TaskNotSupported for a task the
        engine cannot do, EngineError for a failure that is not the request's fault."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


def model_image(family: str, inp: AnalysisInput) -> Image.Image:
    """The PIL RGB image a VLM family sees: for MedGemma with the slice's values on the wire, its trained convention
    (:func:`backend.families.medgemma_rgb`: CT as three HU windows, MR normalised over the acquisition); otherwise
    the image as the view shows it."""
    if family == "medgemma" and inp.values is not None:
        from PIL import Image

        from ..families import medgemma_rgb

        v = inp.values
        return Image.fromarray(medgemma_rgb(v.array, v.unit, v.volume_min, v.volume_max), mode="RGB")
    return inp.image.pil_rgb()
