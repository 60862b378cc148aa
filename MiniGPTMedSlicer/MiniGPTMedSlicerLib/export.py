"""Exports of reviewed findings (Qt-free; the panel and the runner use the same functions): a DICOM SR (TID 1500
Measurement Report in a Comprehensive 3D SR, highdicom), one Slicer ``.mrk.json`` per finding (Slicer's own storage
node) and a table (CSV + JSON). Files are written to a temporary name beside the target and renamed.

Patient and study attributes are copied from the source series into the SR only: this is the one output that carries
them (the user asked for it).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np

from . import review as R
from .markups import ATTR

if TYPE_CHECKING:
    from slicer import vtkMRMLScene

    from .dicom_series import Series

# Labels the engines emit that have a SNOMED CT concept (code, meaning). Others are written as free text under the
# generic "Clinical finding" concept. Sources: SNOMED CT International (browser.ihtsdotools.org).
SNOMED_LABELS: Dict[str, tuple] = {
    "nodule": ("27925004", "Nodule"),
    "mass": ("4147007", "Mass"),
    "lesion": ("52988006", "Lesion"),
    "pleural effusion": ("60046008", "Pleural effusion"),
    "effusion": ("60046008", "Pleural effusion"),
    "pneumothorax": ("36118008", "Pneumothorax"),
    "cardiomegaly": ("8186001", "Cardiomegaly"),
    "fracture": ("125605004", "Fracture of bone"),
    "consolidation": ("95436008", "Lung consolidation"),
}
CLINICAL_FINDING = ("404684003", "Clinical finding")
SCORE_CODE = ("MGM001", "99MINIGPTMED", "Model score")  # private: no standard concept for a detector's score


class ExportError(ValueError):
    pass


@dataclass
class ExportFinding:
    id: str
    tracking_uid: str
    label: str
    status: str
    center_ras: List[float]
    size_mm: List[float]
    corners_ras: List[List[float]]  # the box's 4 corners in its slice plane (x0y0, x1y0, x1y1, x0y1)
    slice_offset_mm: float
    score: Optional[float]
    engine: str
    model: str
    task: str
    time: str
    text: str


def _uid() -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid())


def collect(scene: vtkMRMLScene, statuses: Sequence[str] = R.EXPORTED) -> List[ExportFinding]:
    """The findings with one of ``statuses``, as they are now (an edited ROI where the user left it). The box is the
    ROI's rectangle in its slice plane, through its best slice for a 3D finding of a sweep."""
    from .markups import subject_hierarchy

    sh = subject_hierarchy(scene)
    out = []
    for fid, roi in R.finding_ids(scene).items():
        st = R.status(roi)
        if st not in statuses:
            continue
        c, s, axes = R.geometry(roi)
        ux, uy, n = axes[:, 0], axes[:, 1], axes[:, 2]
        ux, uy, n = ux / np.linalg.norm(ux), uy / np.linalg.norm(uy), n / np.linalg.norm(n)
        plane_c = c
        best = roi.GetAttribute(ATTR + "best_slice_center_ras")
        if best:
            b = np.array([float(v) for v in best.split()])
            plane_c = c + n * float(np.dot(b - c, n))
        hx, hy = ux * s[0] / 2, uy * s[1] / 2
        corners = [plane_c - hx - hy, plane_c + hx - hy, plane_c + hx + hy, plane_c - hx + hy]
        uid = roi.GetAttribute(ATTR + "tracking_uid")
        if not uid:
            uid = _uid()
            roi.SetAttribute(ATTR + "tracking_uid", uid)
        folder = sh.GetItemParent(sh.GetItemByDataNode(roi))
        text = ""
        for child in _children(sh, folder):
            node = sh.GetItemDataNode(child)
            if node is not None and node.IsA("vtkMRMLTextNode"):
                text = node.GetText() or ""
        score = roi.GetAttribute(ATTR + "score")
        out.append(
            ExportFinding(
                id=fid,
                tracking_uid=uid,
                label=roi.GetAttribute(ATTR + "label") or roi.GetName(),
                status=st,
                center_ras=[round(float(v), 4) for v in plane_c],
                size_mm=[round(float(v), 4) for v in s],
                corners_ras=[[round(float(v), 4) for v in p] for p in corners],
                slice_offset_mm=float(roi.GetAttribute(ATTR + "slice_offset") or 0.0),
                score=float(score) if score else None,
                engine=roi.GetAttribute(ATTR + "engine") or "",
                model=roi.GetAttribute(ATTR + "model") or "",
                task=roi.GetAttribute(ATTR + "task") or "",
                time=roi.GetAttribute(ATTR + "time") or "",
                text=text,
            )
        )
    return out


def _children(sh, item: int) -> List[int]:
    import vtk

    ids = vtk.vtkIdList()
    sh.GetItemChildren(item, ids, False)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def _replace_into(path: str, write) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path`` (whole or nothing)."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------- table
TABLE_COLUMNS = [
    "id",
    "label",
    "status",
    "center_r",
    "center_a",
    "center_s",
    "size_x_mm",
    "size_y_mm",
    "size_z_mm",
    "slice_offset_mm",
    "score",
    "engine",
    "model",
    "task",
    "time",
]


def write_table(findings: Sequence[ExportFinding], csv_path: str) -> List[str]:
    """``csv_path`` and a ``.json`` beside it (same rows, with the corners and the findings text)."""

    def csv_rows(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(TABLE_COLUMNS)
            for x in findings:
                score = "" if x.score is None else x.score
                row = [x.id, x.label, x.status, *x.center_ras, *x.size_mm, x.slice_offset_mm, score]
                w.writerow([*row, x.engine, x.model, x.task, x.time])

    def json_rows(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"findings": [asdict(x) for x in findings]}, f, indent=2)

    json_path = os.path.splitext(csv_path)[0] + ".json"
    return [_replace_into(csv_path, csv_rows), _replace_into(json_path, json_rows)]


# -------------------------------------------------------------------------------------------------------- markups
def write_markups(scene: vtkMRMLScene, findings: Sequence[ExportFinding], folder: str) -> List[str]:
    """One ``<id>.mrk.json`` per finding, written by Slicer's ROI JSON storage node."""
    import slicer

    ids = R.finding_ids(scene)
    os.makedirs(folder, exist_ok=True)
    out = []
    for x in findings:
        roi = ids[x.id]

        def write(tmp: str, roi=roi) -> None:
            storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
            storage.SetScene(scene)
            storage.SetFileName(tmp)
            storage.SetWriteFileFormat("json")
            if not storage.WriteData(roi):
                raise OSError(f"Slicer's storage node could not write {tmp}")

        out.append(_replace_into(os.path.join(folder, f"{x.id}.mrk.json"), write))
    return out


# ------------------------------------------------------------------------------------------------------------- SR
def ras_to_lps(p: Sequence[float]) -> np.ndarray:
    return np.array([-float(p[0]), -float(p[1]), float(p[2])])


def _instance_frame(inst) -> tuple:
    r = np.array(inst.orientation[:3])
    c = np.array(inst.orientation[3:])
    return np.array(inst.position), r, c, np.cross(r, c)


def referenced_instance(series: Series, corners_ras: Sequence[Sequence[float]]):
    """The instance whose plane holds the box (the view is the acquisition plane and the box lies on one slice
    within half a slice spacing), else None."""
    pts = np.array([ras_to_lps(p) for p in corners_ras])
    normal = np.cross(pts[1] - pts[0], pts[3] - pts[0])
    normal /= np.linalg.norm(normal)
    insts = [i for i in series.instances if i.position and i.orientation and i.spacing]
    if not insts:
        return None
    n0 = _instance_frame(insts[0])[3]
    if abs(float(np.dot(normal, n0))) < 0.9999:
        return None
    d = [float(np.dot(pts.mean(axis=0) - np.array(i.position), n0)) for i in insts]
    k = int(np.argmin(np.abs(d)))
    gaps = np.abs(np.diff(sorted(float(np.dot(np.array(i.position), n0)) for i in insts)))
    half = (float(np.median(gaps)) if len(gaps) else 1.0) / 2
    return insts[k] if abs(d[k]) <= half else None


def lps_to_pixel(inst, lps: np.ndarray) -> tuple:
    """(column, row) in DICOM SCOORD pixel coordinates: (0, 0) is the top-left corner of the top-left pixel."""
    ipp, r, c, _ = _instance_frame(inst)
    row_spacing, col_spacing = inst.spacing
    v = lps - ipp
    return float(np.dot(v, r) / col_spacing + 0.5), float(np.dot(v, c) / row_spacing + 0.5)


def build_sr(findings: Sequence[ExportFinding], series: Series, source_datasets: Sequence[Any]):
    """The SR dataset (highdicom Comprehensive3DSR). ``source_datasets``: the series' instances (no pixels needed)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if not source_datasets:
        raise ExportError("the DICOM SR needs the source series' instances")
    engine = findings[0].engine if findings else "unknown"
    model = findings[0].model if findings else "unknown"
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(), name=f"MiniGPTMedSlicer {engine}"[:64], model_name=model[:64]
        ),
    )
    groups = []
    for x in findings:
        key = x.label.strip().lower()
        code = SNOMED_LABELS.get(key)
        finding_type = Code(code[0], "SCT", code[1]) if code else Code(CLINICAL_FINDING[0], "SCT", CLINICAL_FINDING[1])
        closed = [*x.corners_ras, x.corners_ras[0]]
        inst = referenced_instance(series, x.corners_ras)
        region: Any
        if inst is not None:
            px = np.array([lps_to_pixel(inst, ras_to_lps(p)) for p in closed])
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=px,
                source_image=hd.sr.SourceImageForRegion(inst.sop_class_uid, inst.sop_instance_uid),
            )
        else:
            region = hd.sr.ImageRegion3D(
                graphic_type=hd.sr.GraphicTypeValues3D.POLYLINE,
                graphic_data=np.array([ras_to_lps(p) for p in closed]),
                frame_of_reference_uid=series.frame_of_reference_uid,
            )
        measurements = []
        if x.score is not None:
            measurements.append(
                hd.sr.Measurement(name=Code(*SCORE_CODE), value=float(x.score), unit=Code("1", "UCUM", "no units"))
            )
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=x.tracking_uid, identifier=f"{x.id} {x.label}"[:64]),
            referenced_region=region,
            finding_type=finding_type,
            algorithm_id=hd.sr.AlgorithmIdentification(name=x.engine[:64] or "unknown", version=x.model[:64] or "-"),
            measurements=measurements or None,
        )
        items = [f"label: {x.label}" if not code else "", f"review: {x.status}", x.text]
        for text in filter(None, items):
            group[0].ContentSequence.append(
                hd.sr.TextContentItem(
                    name=Code("121071", "DCM", "Finding"),
                    value=text[:1024],
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
        groups.append(group)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=Code("363679005", "SCT", "Imaging procedure"),
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(source_datasets),
        content=report[0],
        series_instance_uid=_uid(),
        series_number=900,
        sop_instance_uid=_uid(),
        instance_number=1,
        manufacturer="MiniGPTMedSlicer",
        is_complete=True,
    )


def source_datasets(series: Series) -> List[Any]:
    import pydicom

    return [pydicom.dcmread(p, stop_before_pixels=True) for p in series.files]


def write_sr(findings: Sequence[ExportFinding], series: Optional[Series], path: str, datasets=None) -> str:
    """Write the SR to ``path`` (temporary name, then renamed). A source that is not DICOM: ExportError."""
    if series is None:
        raise ExportError("DICOM SR export needs a DICOM source: this volume is not DICOM (no study to reference)")
    sr = build_sr(findings, series, datasets if datasets is not None else source_datasets(series))
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: findings text may hold "×", "µ", ...
    return _replace_into(path, lambda tmp: sr.save_as(tmp, enforce_file_format=True))


# --------------------------------------------------------------------------------------------- a folder (the panel)
SR_FILE, TABLE_FILE, MARKUPS_FOLDER = "findings-sr.dcm", "findings.csv", "markups"


@dataclass
class FolderExport:
    written: List[str]  # the files written, whole
    problems: List[str]  # one line per export that could not be written (the others still are)


def export_folder(
    scene: vtkMRMLScene,
    folder: str,
    series: Optional[Series],
    sr: bool = True,
    table: bool = True,
    markups: bool = True,
) -> FolderExport:
    """The accepted and edited findings into ``folder``: ``findings-sr.dcm`` (needs ``series``, the DICOM source),
    ``findings.csv`` + ``.json``, ``markups/<id>.mrk.json``. A failed export is reported, the others are written."""
    findings = collect(scene)
    out = FolderExport([], [])
    if not findings:
        out.problems.append("nothing to export: no accepted or edited finding (pending and rejected ones are not)")
        return out
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        out.problems.append(f"{folder}: cannot create this folder ({e.strerror})")
        return out
    steps = []
    if table:
        steps.append(("table", lambda: write_table(findings, os.path.join(folder, TABLE_FILE))))
    if markups:
        steps.append(("markups", lambda: _replace_markups(scene, findings, os.path.join(folder, MARKUPS_FOLDER))))
    if sr:
        steps.append(("DICOM SR", lambda: [write_sr(findings, series, os.path.join(folder, SR_FILE))]))
    for what, step in steps:
        try:
            out.written += step()
        except (ExportError, OSError) as e:
            out.problems.append(f"{what}: {e}")
    return out


def _replace_markups(scene: vtkMRMLScene, findings: Sequence[ExportFinding], folder: str) -> List[str]:
    """:func:`write_markups`, then remove the ``F<n>.mrk.json`` files of an earlier export that this one has not
    (a finding since rejected): the folder holds the export as it is now."""
    import re

    written = write_markups(scene, findings, folder)
    keep = {os.path.basename(p) for p in written}
    for name in os.listdir(folder):
        if re.fullmatch(r"F\d+\.mrk\.json", name) and name not in keep:
            os.remove(os.path.join(folder, name))
    return written
