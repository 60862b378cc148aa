"""Review of findings (Qt-free): pending / accepted / rejected / edited, kept as node attributes of each finding ROI
(saved with the scene), with the reviewer's time stamp; the original box is kept when a finding is edited.

A finding's id is ``F<n>``: its place among all finding ROIs of the scene, oldest analysis first (what the panel's
rows, the runner's review file and the exports call it).
"""

from __future__ import annotations

import datetime
import json
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np

from .markups import ATTR, analysis_nodes, list_results

if TYPE_CHECKING:
    from slicer import vtkMRMLMarkupsROINode, vtkMRMLScene

PENDING, ACCEPTED, REJECTED, EDITED = "pending", "accepted", "rejected", "edited"
STATUSES = (PENDING, ACCEPTED, REJECTED, EDITED)
EXPORTED = (ACCEPTED, EDITED)

STATUS_ATTR = ATTR + "review"
TIME_ATTR = ATTR + "review_time"
ORIGINAL_ATTR = ATTR + "original_box"  # "cx cy cz sx sy sz" + the 3x3 axes, row by row (RAS mm)


class ReviewError(ValueError):
    pass


def finding_rois(scene: vtkMRMLScene) -> List[vtkMRMLMarkupsROINode]:
    """Every finding ROI, oldest analysis first (their ids are F1, F2, ...)."""
    out = []
    for item in list_results(scene):
        out += [n for n in analysis_nodes(scene, item) if n.IsA("vtkMRMLMarkupsROINode")]
    return out


def finding_ids(scene: vtkMRMLScene) -> Dict[str, Any]:
    return {f"F{i}": roi for i, roi in enumerate(finding_rois(scene), 1)}


def status(roi: vtkMRMLMarkupsROINode) -> str:
    return roi.GetAttribute(STATUS_ATTR) or PENDING


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def set_status(roi: vtkMRMLMarkupsROINode, value: str, when: Optional[str] = None) -> None:
    """Set the status and time stamp; rejected findings are hidden (not deleted), others shown."""
    if value not in STATUSES:
        raise ReviewError(f"unknown review status {value!r} (one of {', '.join(STATUSES)})")
    roi.SetAttribute(STATUS_ATTR, value)
    roi.SetAttribute(TIME_ATTR, when or _now())
    d = roi.GetDisplayNode()
    if d is not None:
        d.SetVisibility(value != REJECTED)


def set_all(rois: Sequence[vtkMRMLMarkupsROINode], value: str) -> None:
    when = _now()
    for roi in rois:
        set_status(roi, value, when)


def geometry(roi: vtkMRMLMarkupsROINode) -> tuple:
    """(centre RAS, size mm, axes 3x3 with columns x, y, normal) of an ROI."""
    m = roi.GetObjectToWorldMatrix()
    axes = np.array([[m.GetElement(i, j) for j in range(3)] for i in range(3)])
    c = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(c)
    return np.array(c), np.array(roi.GetSize(), dtype=float), axes


def original_geometry(roi: vtkMRMLMarkupsROINode) -> Optional[tuple]:
    text = roi.GetAttribute(ORIGINAL_ATTR)
    if not text:
        return None
    v = np.array([float(x) for x in text.split()])
    return v[:3], v[3:6], v[6:15].reshape(3, 3)


def begin_edit(roi: vtkMRMLMarkupsROINode) -> None:
    """Unlock the finding so the user can move / resize its ROI; the box before the first edit is kept."""
    if not roi.GetAttribute(ORIGINAL_ATTR):
        c, s, axes = geometry(roi)
        roi.SetAttribute(ORIGINAL_ATTR, " ".join(f"{v:.6g}" for v in (*c, *s, *axes.ravel())))
    roi.SetLocked(False)
    d = roi.GetDisplayNode()
    if d is not None:
        d.SetHandlesInteractive(True)


def finish_edit(roi: vtkMRMLMarkupsROINode, tol_mm: float = 1e-3) -> str:
    """Lock the ROI again; if it moved or changed size its status becomes edited. Returns the status."""
    roi.SetLocked(True)
    d = roi.GetDisplayNode()
    if d is not None:
        d.SetHandlesInteractive(False)
    orig = original_geometry(roi)
    if orig is not None:
        c, s, _ = geometry(roi)
        if np.abs(c - orig[0]).max() > tol_mm or np.abs(s - orig[1]).max() > tol_mm:
            set_status(roi, EDITED)
    return status(roi)


def move_roi(roi: vtkMRMLMarkupsROINode, center: Sequence[float], size: Sequence[float]) -> None:
    """Move / resize an ROI in its own axes (what dragging its handles does)."""
    import vtk

    _, _, axes = geometry(roi)
    m = vtk.vtkMatrix4x4()
    for i in range(3):
        for j in range(3):
            m.SetElement(i, j, float(axes[i, j]))
        m.SetElement(i, 3, float(center[i]))
    roi.SetAndObserveObjectToNodeMatrix(m)
    roi.SetSize(float(size[0]), float(size[1]), float(size[2]))


def apply_review(scene: vtkMRMLScene, review: Dict[str, Any]) -> Dict[str, str]:
    """A review file's content: ``{"findings": [{"id": "F1", "status": "accepted"}, {"id": "F2", "status": "edited",
    "box_px": [x0, y0, x1, y1]}, {"id": "F3", "status": "edited", "center_ras": [..], "size_mm": [..]}]}``. Findings
    not named stay pending. ``box_px`` is in pixels of the image that was sent (single-slice analyses). All entries
    are checked before anything changes."""
    from .geometry import box_to_plane_roi

    ids = finding_ids(scene)
    entries = review.get("findings") if isinstance(review, dict) else None
    if not isinstance(entries, list):
        raise ReviewError('a review file holds {"findings": [{"id": "F1", "status": "accepted"}, ...]}')
    plan = []
    for e in entries:
        fid, value = (e.get("id"), e.get("status")) if isinstance(e, dict) else (None, None)
        if fid not in ids:
            raise ReviewError(f"review: no finding {fid!r} (there are {', '.join(ids) or 'none'})")
        if value not in STATUSES:
            raise ReviewError(f"review: {fid}: status must be one of {', '.join(STATUSES)}, got {value!r}")
        roi = ids[fid]
        move: Optional[tuple] = None
        if "box_px" in e:
            m = roi.GetAttribute(ATTR + "pixel_to_ras")
            box = e["box_px"]
            if not m:
                raise ReviewError(f"review: {fid}: box_px needs a single-slice analysis; give center_ras and size_mm")
            if not (isinstance(box, list) and len(box) == 4 and box[0] < box[2] and box[1] < box[3]):
                raise ReviewError(f"review: {fid}: box_px must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
            mat = np.array([float(v) for v in m.split()]).reshape(4, 4)
            center, size2, _ = box_to_plane_roi(mat, [float(v) for v in box], float(roi.GetSize()[2]))
            move = (center, size2)
        elif "center_ras" in e or "size_mm" in e:
            try:
                c, s = [float(v) for v in e["center_ras"]], [float(v) for v in e["size_mm"]]
            except (KeyError, TypeError, ValueError):
                raise ReviewError(f"review: {fid}: center_ras and size_mm are three numbers each") from None
            if len(c) != 3 or len(s) != 3 or min(s) <= 0:
                raise ReviewError(f"review: {fid}: center_ras and size_mm are three numbers each (sizes > 0)")
            move = (c, s)
        plan.append((roi, value, move))
    for roi, value, move in plan:
        if move is not None:
            begin_edit(roi)
            move_roi(roi, *move)
            finish_edit(roi)
        set_status(roi, value)
    return {fid: status(roi) for fid, roi in ids.items()}


def load_review_file(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ReviewError(f"{path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ReviewError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
