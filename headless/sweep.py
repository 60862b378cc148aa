"""The headless sweep driver: the three phases of :mod:`MiniGPTMedSlicerLib.sweep` (capture, analyze, merge) in the
calling thread. The Slicer panel runs the same phases itself (capture on the main thread, the network off it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib.client import BackendClient
from MiniGPTMedSlicerLib.merge3d import Finding3D, MergeOptions
from MiniGPTMedSlicerLib.sweep import ProgressCallback, SweepPlan, analyze_sweep, capture_sweep, merge_sweep, plan_sweep

if TYPE_CHECKING:  # Slicer's MRML classes; without stubs, mypy sees them as Any
    from slicer import vtkMRMLSliceLogic, vtkMRMLVolumeNode


@dataclass
class SweepResult:
    plan: SweepPlan
    task: str
    responses: list[protocol.AnalyzeResponse]
    findings: list[Finding3D]
    pixel_to_ras: list = field(default_factory=list)  # one 4x4 per swept slice
    elapsed_s: float = 0.0


def run_sweep(
    slice_logic: vtkMRMLSliceLogic,
    volume_node: vtkMRMLVolumeNode,
    client: BackendClient,
    task: str = protocol.DETECT.id,
    question: str | None = None,
    slice_range: tuple[int, int] | None = None,
    step: int = 1,
    batch_size: int = 8,
    export_size: int | Sequence[int] | None = None,
    options: MergeOptions | None = None,
    cancel: threading.Event | None = None,
    progress: ProgressCallback | None = None,
) -> SweepResult:
    """All three phases in the calling thread. No markups are created here."""
    t0 = time.monotonic()
    plan = plan_sweep(slice_logic, volume_node, slice_range, step)
    captured = capture_sweep(slice_logic, plan, export_size=export_size, cancel=cancel)
    responses = analyze_sweep(client, captured, task, question, batch_size, cancel=cancel, progress=progress)
    findings = merge_sweep(captured, responses, plan, options)
    return SweepResult(
        plan=plan,
        task=task,
        responses=responses,
        findings=findings,
        pixel_to_ras=[c.pixel_to_ras for c in captured],
        elapsed_s=time.monotonic() - t0,
    )
