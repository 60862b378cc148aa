"""The wire protocol between the Slicer module (or the headless runner) and the backend, defined once.

Both sides import this file: the backend uses the dataclasses as FastAPI request bodies and response
models (so ``/docs`` shows them), and the client uses ``from_dict`` to validate every response it
receives. A field renamed on one side therefore fails on the other side's tests.

Pure stdlib so that it runs inside Slicer's Python (3.9+) with nothing installed.

Conventions
-----------
* Boxes are ``[x0, y0, x1, y1]`` in pixels of the image that was sent: origin at the top-left
  corner of the top-left pixel, x to the right, y down, ``x0 < x1`` and ``y0 < y1``, clipped to the image.
* ``pixel_spacing_mm`` is ``[row, col]`` = ``[dy, dx]`` in millimetres, as DICOM's PixelSpacing.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, TypeVar, Union

API_VERSION = "v1"

#: The backend's default address; the CLI, the panel, the client and the runner read these.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"


@dataclass(frozen=True)
class TaskSpec:
    """One task: its wire id, its label in the panel, what it needs and whether it returns boxes."""

    id: str
    label: str
    description: str
    question: Optional[str] = None  # when the task needs a question: what it is ("a question", ...)
    needs_region: bool = False
    boxes: bool = False
    hint: Optional[str] = None  # the panel's question field for this task (None: the task reads no question)


REPORT = TaskSpec("report", "Report", "a findings report of the image")
VQA = TaskSpec("vqa", "Ask", "answer a free-text question", question="a question", hint="the question")
DETECT = TaskSpec(
    "detect",
    "Detect",
    "boxes around findings (the question names the kind)",
    boxes=True,
    hint="kind of finding (optional)",
)
GROUND = TaskSpec(
    "ground",
    "Locate",
    "the box of a phrase",
    question="the phrase to locate",
    boxes=True,
    hint="the phrase to locate",
)
IDENTIFY = TaskSpec("identify", "Identify region", "describe a region given as a box", needs_region=True, boxes=True)

#: Every task, in the panel's order. Adding a task is one record here plus each engine's prompt.
TASK_TABLE: Tuple[TaskSpec, ...] = (REPORT, VQA, DETECT, GROUND, IDENTIFY)
TASKS: Tuple[str, ...] = tuple(t.id for t in TASK_TABLE)
BOX_TASKS: Tuple[str, ...] = tuple(t.id for t in TASK_TABLE if t.boxes)
TEXT_TASKS: Tuple[str, ...] = tuple(t.id for t in TASK_TABLE if not t.boxes)
if TYPE_CHECKING:
    Task = str
else:
    Task = Literal[TASKS]


def task_spec(task: str) -> TaskSpec:
    """The record of a wire task id (KeyError names the choices)."""
    for t in TASK_TABLE:
        if t.id == task:
            return t
    raise KeyError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def task_by_label(label: str) -> Optional[TaskSpec]:
    """The record shown as ``label`` in the panel, or None."""
    return next((t for t in TASK_TABLE if t.label == label), None)


def missing_input(task: str, question: Optional[str], region: Optional[Sequence[float]]) -> Optional[str]:
    """What a request for ``task`` still lacks: ``"question"``, ``"region"`` or None (checked once, here)."""
    spec = task_spec(task)
    if spec.question is not None and not (question or "").strip():
        return "question"
    if spec.needs_region and region is None:
        return "region"
    return None


@dataclass(frozen=True)
class ErrorCode:
    """One error code of ``ErrorBody.error.code``: the HTTP status that carries it, what it means, and the ``type``
    of the OpenAI-shaped error on the OpenAI-compatible routes."""

    code: str
    status: int
    description: str
    openai_type: str


ERROR_TABLE: Tuple[ErrorCode, ...] = (
    ErrorCode("bad_request", 400, "bad field", "invalid_request_error"),
    ErrorCode("bad_image", 400, "bad image", "invalid_request_error"),
    ErrorCode("invalid_json", 400, "the body is not JSON", "invalid_request_error"),
    ErrorCode("unauthorized", 401, "missing or wrong access token", "invalid_request_error"),
    ErrorCode("not_found", 404, "no such route", "invalid_request_error"),
    ErrorCode("image_not_found", 404, "no image stored under this image_id: upload it again", "invalid_request_error"),
    ErrorCode("request_not_found", 404, "no running request with this id", "invalid_request_error"),
    ErrorCode("image_expired", 410, "the image was evicted from the store: upload it again", "invalid_request_error"),
    ErrorCode("too_large", 413, "too large", "invalid_request_error"),
    ErrorCode("invalid_schema", 422, "does not match the schema", "invalid_request_error"),
    ErrorCode("not_supported", 501, "task not supported by this engine", "server_error"),
    ErrorCode("busy", 503, "engine busy; see Retry-After", "server_error"),
    ErrorCode("not_ready", 503, "engine not ready", "server_error"),
    ErrorCode("engine_error", 503, "engine failed", "server_error"),
    ErrorCode("timeout", 504, "time limit reached", "server_error"),
    ErrorCode("cancelled", 499, "the request was cancelled (DELETE /v1/requests/{id})", "invalid_request_error"),
)
#: The codes that mean "upload the image again, then retry with the new image_id" (the client does it itself).
REUPLOAD_CODES: Tuple[str, ...] = ("image_not_found", "image_expired")
ERRORS: Dict[str, ErrorCode] = {e.code: e for e in ERROR_TABLE}
#: Error codes used in ``ErrorBody.error.code``; the HTTP status that carries each one.
ERROR_STATUS: Dict[str, int] = {e.code: e.status for e in ERROR_TABLE}


def status_descriptions(statuses: Sequence[int] = ()) -> Dict[int, str]:
    """HTTP status -> the descriptions of its codes joined (for the OpenAPI ``responses`` of a route)."""
    out: Dict[int, List[str]] = {}
    for e in ERROR_TABLE:
        if not statuses or e.status in statuses:
            out.setdefault(e.status, []).append(e.description)
    return {k: ", ".join(v) for k, v in out.items()}


class ProtocolError(ValueError):
    """A message does not match the schema. ``path`` names the offending field."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


@dataclass
class Finding:
    """One detection: a label and a box in pixels of the sent image."""

    label: str
    box: List[float]
    score: Optional[float] = None


@dataclass
class SliceValues:
    """The slice's scalar values (``AnalyzeRequest.values``): resliced with exactly the geometry of ``image`` (same
    width and height, same pixel -> RAS), sent losslessly. ``image`` stays what the view shows.

    * ``data``: base64 of a 16-bit grayscale PNG of ``image``'s size; ``value = slope * stored + intercept``.
    * ``unit``: ``"HU"`` for CT (Hounsfield units), ``"raw"`` for anything else (MR: the scanner's own scale).
    * ``volume_min`` / ``volume_max``: the whole volume's range in value units, so that an engine can normalise
      over the acquisition rather than the slice (MedGemma's MR convention). Optional.
    """

    data: str
    slope: float
    intercept: float
    unit: Literal["HU", "raw"]
    volume_min: Optional[float] = None
    volume_max: Optional[float] = None


@dataclass
class HistoryTurn:
    """An earlier turn of a conversation about the same image (``AnalyzeRequest.history``, oldest first): the
    question asked and the answer as the model wrote it (the response's ``raw_output``). ``task`` is the task of that
    turn (default ``vqa``); MiniGPT-Med puts its tag (``[vqa]``, ``[refer]``, ...) on the question again."""

    question: str
    answer: str
    task: Optional[Task] = None


@dataclass
class ImageUpload:
    """``POST /v1/images``: store an image (and its scalar values) for follow-up questions."""

    image: str  # as AnalyzeRequest.image
    values: Optional[SliceValues] = None


@dataclass
class StoredImage:
    """The answer to ``POST /v1/images``: ``image_id`` (a content hash of the pixels and values) for
    ``AnalyzeRequest.image_id``, and the image's size."""

    image_id: str
    width: int
    height: int


@dataclass
class CancelResult:
    """The answer to ``DELETE /v1/requests/{id}``."""

    request_id: str
    cancelled: bool


@dataclass
class StreamDelta:
    """``event: delta`` of a streamed ``/v1/analyze``: the next piece of the answer's text (whole characters)."""

    text: str


#: Server-sent event names of a streamed ``/v1/analyze``: deltas, then one ``done`` (an AnalyzeResponse) or one
#: ``error`` (an ErrorBody).
STREAM_DELTA, STREAM_DONE, STREAM_ERROR = "delta", "done", "error"


def format_event(event: str, data: Any) -> str:
    """One server-sent event: ``event: NAME`` and the JSON of ``data`` on one ``data:`` line (JSON never needs a raw
    newline); read back by :class:`.sse.SseParser`."""
    import json

    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


#: The response header carrying the request's id (for ``DELETE /v1/requests/{id}``); sent before any stream byte.
REQUEST_ID_HEADER = "X-Request-ID"


@dataclass
class AnalyzeRequest:
    """``POST /v1/analyze``: one image (``image``, or the ``image_id`` of a stored one) and what to do with it."""

    task: Task
    image: Optional[str] = None  # base64 of PNG or JPEG bytes (8-bit gray/RGB, or 16-bit gray)
    question: Optional[str] = None
    region: Optional[List[float]] = None  # [x0, y0, x1, y1] pixels; required when the task needs a region
    pixel_spacing_mm: Optional[List[float]] = None  # [row, col]
    modality: Optional[str] = None  # CT, MR, XR, ...
    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None  # 0 = greedy
    prompt: Optional[str] = None  # expert override: the instruction text sent to the model verbatim
    values: Optional[SliceValues] = None  # the slice's scalar values (HU on CT), same geometry as image
    image_id: Optional[str] = None  # instead of image (and values): an image stored by POST /v1/images
    history: Optional[List[HistoryTurn]] = None  # earlier turns about this image, oldest first
    stream: Optional[bool] = None  # answer as server-sent events (single /v1/analyze only)


@dataclass
class AnalyzeResponse:
    task: str
    engine: str
    model: str
    text: str
    findings: List[Finding] = field(default_factory=list)
    raw_output: str = ""
    timings_ms: Dict[str, float] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)  # e.g. boxes dropped from malformed model output


@dataclass
class BatchRequest:
    """``POST /v1/analyze/batch``: many images (e.g. the slices of a sweep), run as real batches."""

    items: List[AnalyzeRequest]


@dataclass
class BatchResponse:
    results: List[AnalyzeResponse]
    timings_ms: Dict[str, float] = field(default_factory=dict)


@dataclass
class Health:
    status: str
    engine: str
    model: str
    device: str
    tasks: List[str]
    version: str
    api: str = API_VERSION
    max_batch: int = 1


@dataclass
class ErrorDetail:
    code: str
    message: str


@dataclass
class ErrorBody:
    error: ErrorDetail


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with validation (no pydantic on the Slicer side)
# ---------------------------------------------------------------------------------------------

T = TypeVar("T")

_NONE_TYPE = type(None)


def to_dict(obj: Any) -> Dict[str, Any]:
    """A dataclass instance as a JSON-ready dict (None-valued optional request fields dropped)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"expected a dataclass instance, got {type(obj).__name__}")
    out = dataclasses.asdict(obj)
    if isinstance(obj, (AnalyzeRequest, ImageUpload)):
        out = {k: v for k, v in out.items() if v is not None}
        for t in out.get("history") or ():
            if t.get("task") is None:
                t.pop("task", None)
    elif isinstance(obj, BatchRequest):
        out = {"items": [{k: v for k, v in it.items() if v is not None} for it in out["items"]]}
    return out


def from_dict(cls: Type[T], data: Any, path: str = "") -> T:
    """Build ``cls`` from parsed JSON, checking every field's type. Unknown keys are an error."""
    if not isinstance(data, dict):
        raise ProtocolError(path, f"expected an object for {cls.__name__}, got {_json_type(data)}")
    hints = typing.get_type_hints(cls, globalns=vars(sys.modules[__name__]))
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ProtocolError(path, f"unknown field(s) {', '.join(unknown)} for {cls.__name__}")
    kwargs: Dict[str, Any] = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ProtocolError(sub, "field required")
            continue
        kwargs[name] = _convert(hints[name], data[name], sub)
    return cls(**kwargs)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _convert(tp: Any, v: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if v is None:
            if _NONE_TYPE in args:
                return None
            raise ProtocolError(path, "must not be null")
        inner = [a for a in args if a is not _NONE_TYPE]
        if len(inner) == 1:
            return _convert(inner[0], v, path)
        raise TypeError(f"unsupported union {tp}")  # pragma: no cover - schema authoring error
    if origin is Literal:
        if v not in args:
            raise ProtocolError(path, f"must be one of {', '.join(map(str, args))}; got {v!r}")
        return v
    if origin in (list, List):
        if not isinstance(v, list):
            raise ProtocolError(path, f"expected an array, got {_json_type(v)}")
        return [_convert(args[0], x, f"{path}[{i}]") for i, x in enumerate(v)]
    if origin in (dict, Dict):
        if not isinstance(v, dict):
            raise ProtocolError(path, f"expected an object, got {_json_type(v)}")
        return {str(k): _convert(args[1], x, f"{path}.{k}") for k, x in v.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, path)  # type: ignore[arg-type]
    if tp is str:
        if not isinstance(v, str):
            raise ProtocolError(path, f"expected a string, got {_json_type(v)}")
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise ProtocolError(path, f"expected a boolean, got {_json_type(v)}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise ProtocolError(path, f"expected an integer, got {_json_type(v)}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ProtocolError(path, f"expected a number, got {_json_type(v)}")
        if not math.isfinite(v):
            raise ProtocolError(path, "must be a finite number")
        return float(v)
    if tp is Any:
        return v
    raise TypeError(f"unsupported type {tp!r} at {path}")  # pragma: no cover


def box_is_valid(box: List[float], width: int, height: int) -> bool:
    """True when ``box`` obeys the wire convention for an image of ``width`` x ``height``."""
    if len(box) != 4 or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in box):
        return False
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
