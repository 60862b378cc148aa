"""Findings -> MRML: one oriented ROI per finding in the slice plane, a text node with the findings text, all under
one subject-hierarchy folder per analysis. All or nothing: a failure leaves the scene exactly as it was.

Text lives in node attributes and a vtkMRMLTextNode, never in node descriptions (the markups logic wipes those).
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import protocol
from .geometry import box_to_plane_roi

if TYPE_CHECKING:  # Slicer's MRML classes (the app's or slicer-core's); without stubs, mypy sees them as Any
    from slicer import vtkMRMLMarkupsROINode, vtkMRMLNode, vtkMRMLScene, vtkMRMLSliceNode, vtkMRMLSubjectHierarchyNode

    from .capture import CapturedSlice
    from .merge3d import Finding3D

ATTR = "MiniGPTMed."
FOLDER_ATTR = ATTR + "analysis"
#: Node reference role from an analysis' text node to the volume it was captured from. A reference, not an attribute:
#: Slicer renames it when an added scene's node IDs are renumbered.
VOLUME_ROLE = ATTR + "volume"


@dataclass
class AnalysisNodes:
    folder_item: int
    rois: List[Any] = field(default_factory=list)
    text_node: Optional[Any] = None
    name: str = ""


@dataclass
class FindingRow:
    node_id: str
    label: str
    size_mm: Tuple[float, ...]
    view: str
    slice_offset_mm: float
    score: Optional[float]
    analysis: str
    status: str = "pending"  # review status (see review.py)


# Distinct hues for labels; brighter-than-surroundings findings warm, darker ones cool.
_PALETTE = [
    (1.0, 0.55, 0.1),
    (0.2, 0.8, 1.0),
    (0.3, 1.0, 0.3),
    (1.0, 0.3, 0.8),
    (1.0, 0.95, 0.2),
    (0.6, 0.45, 1.0),
    (1.0, 0.25, 0.25),
    (0.2, 1.0, 0.85),
    (0.95, 0.6, 0.6),
    (0.6, 0.8, 0.2),
]
_WARM, _COOL = ("hyper", "bright"), ("hypo", "dark")


def label_color(label: str) -> Tuple[float, float, float]:
    """A stable colour per label (same label -> same colour in every analysis and session)."""
    key = label.strip().lower()
    if key.startswith(_WARM):
        return _PALETTE[0]
    if key.startswith(_COOL):
        return _PALETTE[1]
    h = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16)
    return _PALETTE[2 + h % (len(_PALETTE) - 2)]


def subject_hierarchy(scene: vtkMRMLScene) -> vtkMRMLSubjectHierarchyNode:
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        raise RuntimeError("the scene has no subject hierarchy")
    return sh


def _matrix(axes: np.ndarray, center: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    for i in range(3):
        for j in range(3):
            m.SetElement(i, j, float(axes[i, j]))
        m.SetElement(i, 3, float(center[i]))
    return m


def remove_node(scene: vtkMRMLScene, node: vtkMRMLNode) -> None:
    """Remove a node with its display and storage nodes."""
    if node is None or scene.GetNodeByID(node.GetID()) is None:
        return
    if node.IsA("vtkMRMLDisplayableNode"):
        for i in reversed(range(node.GetNumberOfDisplayNodes())):
            d = node.GetNthDisplayNode(i)
            if d is not None:
                scene.RemoveNode(d)
    if node.IsA("vtkMRMLStorableNode"):
        for i in reversed(range(node.GetNumberOfStorageNodes())):
            s = node.GetNthStorageNode(i)
            if s is not None:
                scene.RemoveNode(s)
    scene.RemoveNode(node)


def add_roi(
    scene: vtkMRMLScene,
    name: str,
    center: Union[Sequence[float], np.ndarray],
    size: Sequence[float],
    axes: np.ndarray,
    color: Tuple[float, float, float],
    attributes: Dict[str, str],
    point_label: str,
) -> vtkMRMLMarkupsROINode:
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.CreateDefaultDisplayNodes()
    roi.SetAndObserveObjectToNodeMatrix(_matrix(axes, np.asarray(center)))  # before SetSize: it sets the centre
    roi.SetSize(float(size[0]), float(size[1]), float(size[2]))
    if roi.GetNumberOfControlPoints() > 0:
        roi.SetNthControlPointLabel(0, point_label)  # kept in the .mrk.json; the view draws the node name
    roi.SetLocked(True)
    d = roi.GetDisplayNode()
    d.SetColor(*color)
    d.SetSelectedColor(*color)
    d.SetFillOpacity(0.08)
    d.SetOutlineOpacity(1.0)
    d.SetTextScale(2.5)
    d.SetPointLabelsVisibility(False)
    d.SetPropertiesLabelVisibility(True)
    d.SetHandlesInteractive(False)
    for k, v in attributes.items():
        roi.SetAttribute(ATTR + k, v)
    return roi


class _Undo:
    """Collects what an operation created; removes all of it if the operation fails."""

    def __init__(self, scene):
        self.scene = scene
        self.nodes: list = []
        self.items: list = []

    def rollback(self) -> None:
        for node in reversed(self.nodes):
            try:
                remove_node(self.scene, node)
            except Exception:
                pass
        if self.items:
            sh = subject_hierarchy(self.scene)
            for item in reversed(self.items):
                sh.RemoveItem(item, False, False)


def _new_folder(scene, undo, name: str, attributes: dict):
    """The subject-hierarchy folder of one analysis, marked as ours."""
    sh = subject_hierarchy(scene)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), name)
    undo.items.append(folder)
    for k, v in {**attributes, "analysis": "1"}.items():
        sh.SetItemAttribute(folder, ATTR + k, v)
    return sh, folder


def _add_text(scene, undo: _Undo, folder: int, name: str, text: str, attributes: dict):
    node = scene.AddNewNodeByClass("vtkMRMLTextNode", name)
    undo.nodes.append(node)
    node.SetText(text)
    for k, v in attributes.items():
        node.SetAttribute(ATTR + k, v)
    subject_hierarchy(scene).CreateItem(folder, node)
    return node


def _fmt(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.4g}"


def _create_all_or_nothing(
    scene: vtkMRMLScene, replace_previous: bool, build: Callable[[_Undo], AnalysisNodes]
) -> AnalysisNodes:
    """Run ``build`` (which records what it creates in the undo list); if it fails remove all of that and re-raise,
    else remove the earlier analyses when ``replace_previous``."""
    previous = list_results(scene) if replace_previous else []
    undo = _Undo(scene)
    try:
        out = build(undo)
    except BaseException:
        undo.rollback()
        raise
    for item in previous:
        remove_analysis(scene, item)
    return out


def _common(captured: CapturedSlice, response: protocol.AnalyzeResponse, now: str) -> Dict[str, str]:
    """The attributes every node of one answer carries."""
    return {
        "task": response.task,
        "engine": response.engine,
        "model": response.model,
        "view": captured.view_name,
        "slice_offset": f"{captured.slice_offset_mm:.3f}",
        "time": now,
        "pixel_to_ras": " ".join(f"{v:.6g}" for v in np.asarray(captured.pixel_to_ras).ravel()),
    }


def _add_finding_rois(
    scene,
    undo: _Undo,
    folder: int,
    captured: CapturedSlice,
    response: protocol.AnalyzeResponse,
    common: dict,
    thickness: float,
    first_index: int = 1,
    extra: Optional[Dict[str, str]] = None,
) -> list:
    """One ROI per finding of ``response`` under ``folder`` (recorded in ``undo``)."""
    sh = subject_hierarchy(scene)
    rois = []
    for i, f in enumerate(response.findings):
        center, size, axes = box_to_plane_roi(captured.pixel_to_ras, f.box, thickness)
        label = f.label or "finding"
        attrs = {
            **common,
            **(extra or {}),
            "label": label,
            "score": _fmt(f.score),
            "box_px": " ".join(f"{v:.2f}" for v in f.box),
            "index": str(first_index + i),
        }
        point_label = f"{label} ({f.score:.2f})" if f.score is not None else label
        roi = add_roi(scene, label, center, size, axes, label_color(label), attrs, point_label)
        undo.nodes.append(roi)
        sh.CreateItem(folder, roi)
        rois.append(roi)
    return rois


def add_analysis_results(
    scene: vtkMRMLScene,
    captured: CapturedSlice,
    response: protocol.AnalyzeResponse,
    *,
    replace_previous: bool = False,
    folder_name: Optional[str] = None,
    thickness_mm: Optional[float] = None,
    text_attributes: Optional[Dict[str, str]] = None,
) -> AnalysisNodes:
    """Create the markups of one analysis. ``captured`` is the :class:`.capture.CapturedSlice` that was sent;
    ``text_attributes`` go on its text node too (e.g. the conversation)."""
    now = datetime.datetime.now().isoformat(timespec="seconds")
    name = folder_name or f"MiniGPT-Med {response.task} ({captured.view_name}, {captured.slice_offset_mm:.1f} mm)"
    thickness = float(thickness_mm or captured.slice_thickness_mm or 1.0)

    def build(undo: _Undo) -> AnalysisNodes:
        common = _common(captured, response, now)
        _sh, folder = _new_folder(scene, undo, name, {**common, "findings": str(len(response.findings))})
        out = AnalysisNodes(folder_item=folder, name=name)
        out.rois = _add_finding_rois(scene, undo, folder, captured, response, common, thickness)
        out.text_node = _add_text(
            scene,
            undo,
            folder,
            f"{name} findings",
            response.text or "(no text)",
            {
                **common,
                "raw_output": response.raw_output,
                "warnings": " | ".join(response.warnings),
                **(text_attributes or {}),
            },
        )
        if captured.volume_node_id:
            out.text_node.SetNodeReferenceID(VOLUME_ROLE, captured.volume_node_id)
        return out

    return _create_all_or_nothing(scene, replace_previous, build)


def text_node_of(scene: vtkMRMLScene, folder_item: int) -> Optional[Any]:
    """The findings text node of an analysis (None if it has none)."""
    for node in analysis_nodes(scene, folder_item):
        if node.IsA("vtkMRMLTextNode"):
            return node
    return None


def add_turn_results(
    scene: vtkMRMLScene,
    folder_item: int,
    captured: CapturedSlice,
    response: protocol.AnalyzeResponse,
    *,
    turn: int,
    text: str,
    text_attributes: Optional[Dict[str, str]] = None,
    thickness_mm: Optional[float] = None,
) -> List[Any]:
    """A follow-up answer (``turn``: its number, 1 = the first) in an existing analysis: its boxes become ROIs under
    that analysis' folder, its text node gets ``text`` and ``text_attributes``. All or nothing."""
    now = datetime.datetime.now().isoformat(timespec="seconds")
    thickness = float(thickness_mm or captured.slice_thickness_mm or 1.0)
    sh = subject_hierarchy(scene)
    before = len([n for n in analysis_nodes(scene, folder_item) if n.IsA("vtkMRMLMarkupsROINode")])
    undo = _Undo(scene)
    try:
        common = _common(captured, response, now)
        rois = _add_finding_rois(
            scene, undo, folder_item, captured, response, common, thickness, before + 1, {"turn": str(turn)}
        )
        node = text_node_of(scene, folder_item)
        if node is None:
            node = _add_text(scene, undo, folder_item, f"{sh.GetItemName(folder_item)} findings", "", {})
        if captured.volume_node_id and not node.GetNodeReferenceID(VOLUME_ROLE):
            node.SetNodeReferenceID(VOLUME_ROLE, captured.volume_node_id)
    except BaseException:
        undo.rollback()
        raise
    node.SetText(text or "(no text)")
    for k, v in {
        "raw_output": response.raw_output,
        "warnings": " | ".join(response.warnings),
        **(text_attributes or {}),
    }.items():
        node.SetAttribute(ATTR + k, v)
    sh.SetItemAttribute(folder_item, ATTR + "findings", str(before + len(rois)))
    return rois


def list_results(scene: vtkMRMLScene) -> List[int]:
    """Subject-hierarchy folder items of the analyses in the scene, oldest first."""
    import vtk

    sh = subject_hierarchy(scene)
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds()) if sh.GetItemAttribute(ids.GetId(i), FOLDER_ATTR) == "1"]


def analysis_nodes(scene: vtkMRMLScene, folder_item: int) -> List[vtkMRMLNode]:
    import vtk

    sh = subject_hierarchy(scene)
    ids = vtk.vtkIdList()
    sh.GetItemChildren(folder_item, ids, True)
    nodes = [sh.GetItemDataNode(ids.GetId(i)) for i in range(ids.GetNumberOfIds())]
    return [n for n in nodes if n is not None]


def remove_analysis(scene: vtkMRMLScene, folder_item: int) -> None:
    for node in analysis_nodes(scene, folder_item):
        remove_node(scene, node)
    subject_hierarchy(scene).RemoveItem(folder_item, False, True)


def clear_results(scene: vtkMRMLScene) -> int:
    items = list_results(scene)
    for item in items:
        remove_analysis(scene, item)
    return len(items)


def finding_rows(scene: vtkMRMLScene) -> List[FindingRow]:
    """One row per finding ROI of every analysis, for the module's findings table."""
    sh = subject_hierarchy(scene)
    rows = []
    for item in list_results(scene):
        analysis = sh.GetItemName(item)
        for node in analysis_nodes(scene, item):
            if not node.IsA("vtkMRMLMarkupsROINode"):
                continue
            score = node.GetAttribute(ATTR + "score")
            rows.append(
                FindingRow(
                    node_id=node.GetID(),
                    label=node.GetAttribute(ATTR + "label") or node.GetName(),
                    size_mm=tuple(round(float(s), 1) for s in node.GetSize()),
                    view=node.GetAttribute(ATTR + "view") or "",
                    slice_offset_mm=float(node.GetAttribute(ATTR + "slice_offset") or 0.0),
                    score=float(score) if score else None,
                    analysis=analysis,
                    status=node.GetAttribute(ATTR + "review") or "pending",
                )
            )
    return rows


def roi_center(roi: vtkMRMLMarkupsROINode) -> np.ndarray:
    c = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(c)
    return np.array(c)


def jump_to_finding(
    slice_nodes: Sequence[vtkMRMLSliceNode], roi: vtkMRMLMarkupsROINode, select: bool = True
) -> np.ndarray:
    """Move the given slice views onto the finding (each keeps its orientation) and select the markup. A 3D finding
    from a sweep is shown on its best slice (the largest box), centred on that box."""
    c = roi_center(roi)
    best = roi.GetAttribute(ATTR + "best_slice_center_ras")
    if best:
        c = np.array([float(v) for v in best.split()])
    for sn in slice_nodes:
        sn.JumpSliceByCentering(float(c[0]), float(c[1]), float(c[2]))
    if select:
        scene = roi.GetScene()
        for node in _all_rois(scene):
            node.SetSelected(node is roi or node.GetID() == roi.GetID())
    return c


def _all_rois(scene) -> list:
    col = scene.GetNodesByClass("vtkMRMLMarkupsROINode")
    return [col.GetItemAsObject(i) for i in range(col.GetNumberOfItems())]


def add_sweep_results(
    scene: vtkMRMLScene,
    findings3d: Sequence[Finding3D],
    *,
    task: str,
    engine: str,
    model: str,
    view_name: str,
    summary: str,
    offsets_mm: Sequence[float],
    folder_name: Optional[str] = None,
    replace_previous: bool = False,
) -> AnalysisNodes:
    """3D findings of a sweep (:class:`.merge3d.Finding3D`) -> one oriented 3D ROI each + a summary text node, under
    one subject-hierarchy folder. All or nothing, like :func:`add_analysis_results`."""
    now = datetime.datetime.now().isoformat(timespec="seconds")
    name = folder_name or f"MiniGPT-Med sweep {task} ({view_name}, {len(offsets_mm)} slices)"

    def build(undo: _Undo) -> AnalysisNodes:
        common = {"task": task, "engine": engine, "model": model, "view": view_name, "time": now, "sweep": "1"}
        sh, folder = _new_folder(scene, undo, name, {**common, "findings": str(len(findings3d))})
        out = AnalysisNodes(folder_item=folder, name=name)
        for i, f in enumerate(findings3d):
            best_offset = offsets_mm[f.best_slice_pos]
            attrs = {
                **common,
                "label": f.label,
                "score": _fmt(f.best_score),
                "index": str(i + 1),
                "slice_offset": f"{best_offset:.3f}",
                "slice_range_mm": f"{offsets_mm[f.first]:.3f} {offsets_mm[f.last]:.3f}",
                "slices": str(len(f.slice_positions)),
                "isolated": "1" if f.isolated else "0",
                "best_slice_center_ras": " ".join(f"{v:.4f}" for v in f.best_center_ras),
            }
            label = f.label + (" (1 slice)" if f.isolated else "")
            roi = add_roi(scene, label, f.center_ras, f.size_mm, np.asarray(f.axes), label_color(f.label), attrs, label)
            undo.nodes.append(roi)
            sh.CreateItem(folder, roi)
            out.rois.append(roi)
        out.text_node = _add_text(scene, undo, folder, f"{name} summary", summary, common)
        return out

    return _create_all_or_nothing(scene, replace_previous, build)
