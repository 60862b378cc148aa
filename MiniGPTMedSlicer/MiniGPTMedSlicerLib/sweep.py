"""Sweep a detection across the slices of a view and merge it into 3D findings.

Three phases, so that the Slicer module can keep MRML on the main thread and the network off it:

1. :func:`plan_sweep` + :func:`capture_sweep` (MRML; main thread): every swept slice is captured exactly as the view
   would show it at that offset (same in-plane geometry, the volume's window/level); the view's offset is restored.
2. :func:`analyze_sweep` (network only; any thread): the captured PNGs go to ``POST /v1/analyze/batch`` in batches,
   with progress (slices done, ETA) and cancellation between batches.
3. :func:`merge_sweep` (pure): 2D boxes -> 3D findings with :mod:`.merge3d`; the markups are created by
   :func:`.markups.add_sweep_results` (MRML; main thread; all or nothing).

The headless driver that runs all three in one thread is :func:`headless.sweep.run_sweep`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

from . import protocol
from .client import PAUSE, Calls, run_calls
from .merge3d import Finding3D, MergeOptions, SliceDetection, merge_detections

if TYPE_CHECKING:  # Slicer's MRML classes (the app's or slicer-core's); without stubs, mypy sees them as Any
    from slicer import vtkMRMLSliceLogic, vtkMRMLVolumeNode

    from .capture import CapturedSlice
    from .client import BackendClient


class SweepCancelled(Exception):
    pass


@dataclass
class SweepPlan:
    indices: List[int]  # slice numbers along the view normal (0 = lowest offset)
    offsets_mm: List[float]
    slice_count: int  # slices of the volume along this view's normal
    spacing_mm: float  # volume spacing along the normal
    step: int = 1

    @property
    def swept_spacing_mm(self) -> float:
        return self.spacing_mm * self.step


@dataclass
class SweepProgress:
    done: int
    total: int
    elapsed_s: float

    @property
    def eta_s(self) -> Optional[float]:
        if self.done == 0:
            return None
        return self.elapsed_s / self.done * (self.total - self.done)

    def __str__(self) -> str:
        eta = self.eta_s
        return f"{self.done}/{self.total} slices" + (f", ETA {eta:.0f} s" if eta is not None else "")


ProgressCallback = Callable[[SweepProgress], None]


def _slice_span(first: int, last: int) -> str:
    return f"slice {first}" if first == last else f"slices {first}–{last}"


def parse_range(text: Optional[str], count: int) -> Tuple[int, int]:
    """``"A:B"`` (B exclusive, either may be empty, negatives count from the end) -> (start, stop) in 0..count."""
    if not text:
        return 0, count
    a, sep, b = text.partition(":")
    if not sep:
        raise ValueError(f"range must look like A:B, got {text!r}")
    try:
        start = int(a) if a.strip() else 0
        stop = int(b) if b.strip() else count
    except ValueError:
        raise ValueError(
            f"range must look like A:B with whole slice numbers (a step goes in --step), got {text!r}"
        ) from None
    start = start + count if start < 0 else start
    stop = stop + count if stop < 0 else stop
    if 0 <= start <= count and 0 <= stop <= count and start >= stop:
        raise ValueError(f"range {text} is empty: B must be greater than A (B is exclusive; 0:{count} is all)")
    if not (0 <= start < stop <= count):
        raise ValueError(f"range {text} is outside the {count} slices of this view (0:{count})")
    return start, stop


def plan_sweep(
    slice_logic: vtkMRMLSliceLogic,
    volume_node: vtkMRMLVolumeNode,
    slice_range: Optional[Tuple[int, int]] = None,
    step: int = 1,
) -> SweepPlan:
    """The slice offsets of ``volume_node`` along the normal of ``slice_logic``'s view: every ``step``-th slice of
    ``slice_range`` (default: all). Works for oblique views too (Slicer's volume slice bounds and spacing)."""
    if step < 1:
        raise ValueError("step must be >= 1")
    bounds = [0.0] * 6
    slice_logic.GetVolumeSliceBounds(volume_node, bounds)
    spacing = float(slice_logic.GetVolumeSliceSpacing(volume_node)[2])
    count = max(1, int(round((bounds[5] - bounds[4]) / spacing)))
    start, stop = slice_range if slice_range is not None else (0, count)
    if not (0 <= start < stop <= count):
        raise ValueError(f"slice range {start}:{stop} is outside the {count} slices of this view")
    indices = list(range(start, stop, step))
    offsets = [bounds[4] + (k + 0.5) * spacing for k in indices]
    return SweepPlan(indices=indices, offsets_mm=offsets, slice_count=count, spacing_mm=spacing, step=step)


def capture_sweep(
    slice_logic: vtkMRMLSliceLogic,
    plan: SweepPlan,
    export_size: Union[int, Sequence[int], None] = None,
    cancel: Optional[threading.Event] = None,
    progress: Optional[ProgressCallback] = None,
) -> List[CapturedSlice]:
    """Capture every planned slice (MRML: call on the main thread). The view's offset is restored afterwards."""
    from .capture import capture_slice

    original = slice_logic.GetSliceOffset()
    out = []
    t0 = time.monotonic()
    try:
        for i, offset in enumerate(plan.offsets_mm):
            if cancel is not None and cancel.is_set():
                raise SweepCancelled("sweep cancelled while capturing")
            slice_logic.SetSliceOffset(offset)
            out.append(capture_slice(slice_logic, export_size=export_size))
            if progress is not None:
                progress(SweepProgress(i + 1, len(plan.offsets_mm), time.monotonic() - t0))
    finally:
        slice_logic.SetSliceOffset(original)
    return out


def capture_at(
    slice_logic: vtkMRMLSliceLogic, offset_mm: float, export_size: Union[int, Sequence[int], None] = None
) -> CapturedSlice:
    """Capture one slice at ``offset_mm`` as the view would show it, then put the view back (MRML: main thread)."""
    from .capture import capture_slice

    original = slice_logic.GetSliceOffset()
    try:
        slice_logic.SetSliceOffset(offset_mm)
        return capture_slice(slice_logic, export_size=export_size)
    finally:
        slice_logic.SetSliceOffset(original)


def sweep_calls(
    client: BackendClient,
    slices: Iterable[CapturedSlice],
    total: int,
    task: str = "detect",
    question: Optional[str] = None,
    batch_size: int = 8,
    cancel: Optional[threading.Event] = None,
    progress: Optional[ProgressCallback] = None,
    **request_options: Any,
) -> Calls:
    """The sweep's calls (see :data:`.client.Calls`): the ``total`` captured slices, taken from ``slices`` one by one
    (a list captured beforehand, or captured on demand when the calls run on the main thread), go to the backend in
    batches. Cancel is checked before each slice and batch and right after each answer (that batch is discarded).
    Returns the responses in slice order."""
    from .capture import to_request

    out: List[protocol.AnalyzeResponse] = []
    chunk: List[protocol.AnalyzeRequest] = []
    t0 = time.monotonic()
    size = max(1, batch_size)
    for n, c in enumerate(slices, 1):
        if cancel is not None and cancel.is_set():
            raise SweepCancelled("sweep cancelled")
        chunk.append(to_request(c, task, question=question, **request_options))
        if len(chunk) < size and n < total:
            yield PAUSE  # an event loop may run between captures
            continue
        answer = yield (client.batch_request(chunk) if len(chunk) > 1 else client.analyze_request(chunk[0]))
        if cancel is not None and cancel.is_set():
            raise SweepCancelled("sweep cancelled")
        out.extend(answer if len(chunk) > 1 else [answer])
        chunk = []
        if progress is not None:
            progress(SweepProgress(len(out), total, time.monotonic() - t0))
    return out


def analyze_sweep(
    client: BackendClient,
    captured: Sequence[CapturedSlice],
    task: str = protocol.DETECT.id,
    question: Optional[str] = None,
    batch_size: int = 8,
    cancel: Optional[threading.Event] = None,
    progress: Optional[ProgressCallback] = None,
    **request_options: Any,
) -> List[protocol.AnalyzeResponse]:
    """Send the captured slices in batches with the blocking transport (network only: safe off the main thread)."""
    calls = sweep_calls(
        client, captured, len(captured), task, question, batch_size, cancel, progress, **request_options
    )
    return run_calls(calls, client, cancel)


def merge_sweep(
    captured: Sequence,
    responses: Sequence[protocol.AnalyzeResponse],
    plan: SweepPlan,
    options: Optional[MergeOptions] = None,
) -> List[Finding3D]:
    dets = [
        SliceDetection(pos, f.label, (f.box[0], f.box[1], f.box[2], f.box[3]), f.score)
        for pos, resp in enumerate(responses)
        for f in resp.findings
    ]
    return merge_detections(dets, [c.pixel_to_ras for c in captured], plan.swept_spacing_mm, options)


def summarize(findings: Sequence[Finding3D], plan: SweepPlan, view: str, engine: str = "", model: str = "") -> str:
    """The sweep's summary text (the text node in the scene, the runner's output)."""
    solid = [f for f in findings if not f.isolated]
    source = f" ({engine}: {model})" if engine else ""
    lines = [
        f"{len(solid)} 3D finding(s) and {len(findings) - len(solid)} single-slice box(es) over "
        f"{len(plan.indices)} {view} slices{source}."
    ]
    for i, f in enumerate(findings):
        score = "" if f.best_score is None else f", best score {f.best_score:.2f}"
        if f.diameter_mm is not None and f.volume_ml is not None:
            score = f", 3D diameter {f.diameter_mm:.0f} mm, volume {f.volume_ml:.2f} mL" + score
        lines.append(
            f"{i + 1}. {f.label}{' (single slice)' if f.isolated else ''}: {f.size_mm[0]:.1f} × "
            f"{f.size_mm[1]:.1f} × {f.size_mm[2]:.1f} mm, {_slice_span(plan.indices[f.first], plan.indices[f.last])}"
            f"{score}"
        )
    return "\n".join(lines)
