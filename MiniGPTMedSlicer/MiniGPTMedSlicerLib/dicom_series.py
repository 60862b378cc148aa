"""DICOM folders: find every series (recursively), describe them, pick one.

Only the tags needed to tell series apart and to place their slices are read (``stop_before_pixels``). The series
description is shown to the user on their own machine; it is never sent to a backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "InstanceNumber",
]


class SeriesChoiceError(ValueError):
    pass


@dataclass
class Instance:
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    position: Optional[Tuple[float, float, float]]  # ImagePositionPatient (LPS mm)
    orientation: Optional[Tuple[float, ...]]  # ImageOrientationPatient (row direction, column direction)
    spacing: Optional[Tuple[float, float]]  # PixelSpacing (between rows, between columns)
    rows: int
    columns: int


@dataclass
class Series:
    uid: str
    modality: str
    description: str
    number: Optional[int]
    study_uid: str
    frame_of_reference_uid: str
    instances: List[Instance] = field(default_factory=list)

    @property
    def slice_count(self) -> int:
        return len(self.instances)

    @property
    def size(self) -> Tuple[int, int, int]:
        """(columns, rows, slices) of the first instance."""
        first = self.instances[0]
        return first.columns, first.rows, len(self.instances)

    @property
    def files(self) -> List[str]:
        return [i.path for i in self.instances]


def is_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def _floats(value, n: int) -> Optional[Tuple[float, ...]]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _read(path: str):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except Exception:
        return None


def _sort_key(inst: Instance):
    """Along the slice normal (IOP row x column), as DICOM readers do; files without geometry keep file order."""
    if inst.position is None or inst.orientation is None:
        return 0.0
    r, c = inst.orientation[:3], inst.orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return sum(p * q for p, q in zip(inst.position, n))


def scan(path: str) -> List[Series]:
    """Every series under ``path`` (a file or a folder, searched recursively), most slices first."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    else:
        files = [path]
    return scan_files(files)


def scan_files(files: Sequence[str]) -> List[Series]:
    """Every image series among ``files`` (non-DICOM files and non-images skipped), most slices first."""
    by_uid: dict = {}
    for f in files:
        if not is_dicom(f):
            continue
        ds = _read(f)
        if ds is None or "Rows" not in ds:  # not an image (an SR, a presentation state, ...)
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or f"(no series UID) {os.path.dirname(f)}")
        s = by_uid.get(uid)
        if s is None:
            number = getattr(ds, "SeriesNumber", None)
            s = by_uid[uid] = Series(
                uid=uid,
                modality=str(getattr(ds, "Modality", "") or "").strip().upper(),
                description=str(getattr(ds, "SeriesDescription", "") or "").strip(),
                number=int(number) if number not in (None, "") else None,
                study_uid=str(getattr(ds, "StudyInstanceUID", "") or ""),
                frame_of_reference_uid=str(getattr(ds, "FrameOfReferenceUID", "") or ""),
            )
        spacing = _floats(getattr(ds, "PixelSpacing", None), 2)
        s.instances.append(
            Instance(
                path=f,
                sop_class_uid=str(getattr(ds, "SOPClassUID", "") or ""),
                sop_instance_uid=str(getattr(ds, "SOPInstanceUID", "") or ""),
                position=_floats(getattr(ds, "ImagePositionPatient", None), 3),  # type: ignore[arg-type]
                orientation=_floats(getattr(ds, "ImageOrientationPatient", None), 6),
                spacing=spacing,  # type: ignore[arg-type]
                rows=int(getattr(ds, "Rows", 0) or 0),
                columns=int(getattr(ds, "Columns", 0) or 0),
            )
        )
    out = list(by_uid.values())
    for s in out:
        s.instances.sort(key=_sort_key)
    out.sort(key=lambda s: (-s.slice_count, s.uid))
    return out


def choose(series: Sequence[Series], selector: Optional[str]) -> Series:
    """``None``: the series with the most slices; else a series UID or its 1-based number in :func:`scan`'s list."""
    if not series:
        raise SeriesChoiceError("no DICOM series found")
    if selector is None or selector == "":
        return series[0]
    for s in series:
        if s.uid == selector:
            return s
    if selector.isdigit():
        k = int(selector)
        if 1 <= k <= len(series):
            return series[k - 1]
        raise SeriesChoiceError(f"--series {selector}: there are {len(series)} series (1..{len(series)})")
    raise SeriesChoiceError(f"--series {selector}: no series with this UID (list them with 'minigptmed-slicer series')")


def describe(series: Sequence[Series]) -> List[str]:
    """One line per series: number, UID, modality, description, slice count, size."""
    lines = []
    for k, s in enumerate(series, 1):
        c, r, n = s.size
        lines.append(f"{k}  {s.uid}  {s.modality or '?'}  {s.description or '-'!r}  {n} slice(s)  {c}x{r}")
    return lines
