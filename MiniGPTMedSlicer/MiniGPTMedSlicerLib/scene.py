"""An MRML scene wired like Slicer's, for the headless runner and the tests (PyPI ``slicer-core``).

Inside the Slicer app none of this is needed: the module uses ``slicer.mrmlScene`` and the app's slice logics and
passes them to the same capture/markups functions.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

from . import dicom_series

if TYPE_CHECKING:  # Slicer's MRML classes (the app's or slicer-core's); without stubs, mypy sees them as Any
    from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSliceLogic, vtkMRMLVolumeNode

# Loading options of vtkSlicerVolumesLogic.AddArchetypeVolume (bit mask)
_LABELMAP, _CENTERED, _SINGLE_FILE, _AUTO_WL = 1, 2, 4, 8

CT_WINDOW_LEVEL = (400.0, 40.0)  # soft tissue


class VolumeLoadError(Exception):
    pass


@dataclass
class SceneContext:
    scene: Any
    app_logic: Any
    volumes_logic: Any
    markups_logic: Any
    colors_logic: Any
    subject_hierarchy_logic: Any
    slice_logics: Dict[str, Any] = field(default_factory=dict)
    # the DICOM series loaded last (its instances' geometry and UIDs, for a DICOM SR export), and what was said
    dicom_series: Optional[dicom_series.Series] = None
    series_note: str = ""


def create_scene() -> SceneContext:
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app)
    verbosity = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    vtk.vtkLogger.SetStderrVerbosity(
        vtk.vtkLogger.VERBOSITY_OFF
    )  # "HomeDirectory is not set": harmless outside the app
    try:
        colors.SetMRMLScene(scene)
    finally:
        vtk.vtkLogger.SetStderrVerbosity(verbosity)
    app.SetModuleLogic("Colors", colors)
    app.SetColorLogic(colors)
    vols = slicer.vtkSlicerVolumesLogic()
    vols.SetMRMLApplicationLogic(app)
    vols.SetMRMLScene(scene)
    app.SetModuleLogic("Volumes", vols)
    mk = slicer.vtkSlicerMarkupsLogic()
    mk.SetMRMLApplicationLogic(app)
    mk.SetMRMLScene(scene)
    app.SetModuleLogic("Markups", mk)
    shl = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    shl.SetMRMLApplicationLogic(app)
    shl.SetMRMLScene(scene)
    app.SetModuleLogic("SubjectHierarchy", shl)
    app.SetSliceLogics(vtk.vtkCollection())
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)  # the singleton, as in the app
    return SceneContext(scene, app, vols, mk, colors, shl)


def _dicom_modality(path: str) -> Optional[str]:
    """Only the Modality tag is read (no names, no other tags)."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        value = str(getattr(ds, "Modality", "") or "").strip().upper()
        return value or None
    except Exception:
        return None


def load_volume(
    ctx: SceneContext, path: str, name: Optional[str] = None, series: Optional[str] = None
) -> vtkMRMLScalarVolumeNode:
    """Load a NIfTI/NRRD/MHA file, a DICOM file or a DICOM folder as a scalar volume. CT gets a soft-tissue window.

    A DICOM folder is searched recursively; ``series`` picks one of its series (a UID or the 1-based number of
    :func:`.dicom_series.describe`'s list), else the one with the most slices (``ctx.series_note`` says which)."""
    import vtk

    path = os.fspath(path)
    if not os.path.exists(path):
        raise VolumeLoadError(f"{path}: no such file or folder")
    name = name or os.path.basename(path.rstrip("/")).split(".")[0] or "volume"
    found = dicom_series.scan(path) if os.path.isdir(path) or dicom_series.is_dicom(path) else []
    dicoms: list = []
    ctx.dicom_series, ctx.series_note = None, ""
    if found:
        try:
            chosen = dicom_series.choose(found, series)
        except dicom_series.SeriesChoiceError as e:
            raise VolumeLoadError(f"{path}: {e}") from None
        dicoms = chosen.files
        ctx.dicom_series = chosen
        if len(found) > 1:
            how = "chosen" if series else "the one with the most slices; pick another with --series"
            ctx.series_note = (
                f"series {found.index(chosen) + 1} of {len(found)}: {chosen.uid} ({chosen.modality or '?'}, "
                f"{chosen.slice_count} slice(s)), {how}"
            )
    elif series:
        raise VolumeLoadError(f"{path}: --series given but this is not DICOM")
    modality = None
    if dicoms:
        files = vtk.vtkStringArray()
        for f in dicoms:
            files.InsertNextValue(f)
        options = _SINGLE_FILE if len(dicoms) == 1 else 0
        missing = _dicom_missing_voxels(dicoms)
        if missing:
            raise VolumeLoadError(f"{path}: {missing}; the volume is not loaded (no voxels are invented)")
        with quiet_vtk():
            node = ctx.volumes_logic.AddArchetypeVolume(dicoms[0], name, options, files)
        modality = _dicom_modality(dicoms[0])
        # Slicer's own attribute for a volume loaded from DICOM: its instances (the SR export references them)
        node.SetAttribute("DICOM.instanceUIDs", " ".join(i.sop_instance_uid for i in chosen.instances))
    elif os.path.isdir(path):
        raise VolumeLoadError(f"{path}: a folder without DICOM files")
    else:
        missing = _nifti_missing_voxels(path)
        if missing:
            raise VolumeLoadError(f"{path}: {missing}; the volume is not loaded (no voxels are invented)")
        with quiet_vtk():
            node = ctx.volumes_logic.AddArchetypeVolume(path, name, _SINGLE_FILE)
    if node is None or node.GetImageData() is None:
        raise VolumeLoadError(f"{path}: cannot read this file as a volume ({_explain_unreadable(path)})")
    image = node.GetImageData()
    if (
        not node.IsA("vtkMRMLScalarVolumeNode")
        or node.IsA("vtkMRMLVectorVolumeNode")
        or image.GetNumberOfScalarComponents() != 1
    ):
        _remove_volume(ctx.scene, node)
        raise VolumeLoadError(
            f"{path}: not a scalar volume ({image.GetNumberOfScalarComponents()} components per voxel)"
        )
    lo, hi = image.GetScalarRange()
    if modality is None and lo <= -900 and hi >= 300:
        modality = "CT"  # Hounsfield range: air at about -1000 (padding often -1024 / -2048 / -3024)
    if modality:
        node.SetAttribute("DICOM.Modality", modality)
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    if modality == "CT":
        display.AutoWindowLevelOff()
        display.SetWindowLevel(*CT_WINDOW_LEVEL)
    return node


@contextlib.contextmanager
def quiet_vtk():
    """VTK's and Slicer's reader errors off while probing a file: the caller reports a failure once, in one line."""
    import vtk

    verbosity = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    shown = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(shown)
        vtk.vtkLogger.SetStderrVerbosity(verbosity)


def _cut_short(have: int, need: int) -> str:
    return f"the file is cut short: it holds {have} of the {need} bytes its header declares"


def _nifti_missing_voxels(path: str) -> Optional[str]:
    """Why a NIfTI file does not hold all its voxels, or None. (ITK and Slicer zero-fill a cut-short .nii.gz.)"""
    low = path.lower()
    if not low.endswith((".nii", ".nii.gz")):
        return None  # NRRD and the rest: their readers fail on short data
    try:
        import nibabel
        import numpy as np

        img: Any = nibabel.load(path)
        need = int(img.dataobj.offset) + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
    except Exception:
        return None  # not NIfTI after all, or nibabel missing: the volume reader decides
    if not low.endswith(".gz"):
        have = os.path.getsize(path)
        return _cut_short(have, need) if have < need else None
    import gzip
    import zlib

    have = 0
    try:
        with gzip.open(path, "rb") as f:
            while have < need:
                chunk = f.read(min(1 << 20, need - have))
                if not chunk:
                    break
                have += len(chunk)
    except (EOFError, zlib.error, OSError):
        pass
    return f"{_cut_short(have, need)} (uncompressed)" if have < need else None


def _dicom_missing_voxels(files: Sequence[str]) -> Optional[str]:
    """Why a DICOM file does not hold all its pixel data (cut short, or fewer bytes than rows x columns x frames)."""
    try:
        import pydicom
    except ImportError:
        return None

    def name(f: str) -> str:
        return f"{os.path.basename(f)}: " if len(files) > 1 else ""

    for f in files:
        try:
            ds = pydicom.dcmread(f, defer_size=1024)
            elem = ds.get_item("PixelData")
        except Exception as e:
            return f"{name(f)}unreadable DICOM ({type(e).__name__})"
        if elem is None:
            return f"{name(f)}no pixel data"
        length = getattr(elem, "length", None)
        tell = getattr(elem, "value_tell", None)
        if length == 0xFFFFFFFF:
            continue  # encapsulated (compressed) pixel data: its decoder checks it
        if length is not None and tell is not None:  # deferred: the header's length against the file's size
            size = os.path.getsize(f)
            if tell + length > size:
                return f"{name(f)}{_cut_short(size - tell, length)} of pixel data"
        else:  # read in full (a cut-short value is read as far as the file goes)
            value = getattr(elem, "value", None)
            if not isinstance(value, (bytes, bytearray)):
                continue
            length = len(value)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and getattr(syntax, "is_compressed", False):
            continue
        need = (
            int(ds.get("Rows", 0))
            * int(ds.get("Columns", 0))
            * int(ds.get("SamplesPerPixel", 1) or 1)
            * int(ds.get("NumberOfFrames", 1) or 1)
            * (int(ds.get("BitsAllocated", 16) or 16) // 8)
        )
        if length < need:
            return f"{name(f)}{length} bytes of pixel data for {need} (rows x columns x frames)"
    return None


def _explain_unreadable(path: str) -> str:
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        if reader.GetDimension() > 3:
            return (
                f"{reader.GetDimension()}D image of size {list(reader.GetSize())}: only 3D scalar volumes are supported"
            )
        if reader.GetNumberOfComponents() > 1:
            return f"{reader.GetNumberOfComponents()} components per voxel: only scalar volumes are supported"
        if reader.GetDimension() < 3:
            return f"a {reader.GetDimension()}D image: only 3D volumes (NIfTI, NRRD, DICOM) are supported"
        reader.Execute()  # the header reads; the data does not: ITK says why (e.g. a cut-short NRRD)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("sitk::")]
        if lines and "Unable to determine ImageIO" not in str(e):
            return lines[-1][:200]
    return "unsupported format or corrupt file"


def _remove_volume(scene, node) -> None:
    for i in range(node.GetNumberOfDisplayNodes()):
        d = node.GetNthDisplayNode(i)
        if d is not None:
            scene.RemoveNode(d)
    if node.GetStorageNode() is not None:
        scene.RemoveNode(node.GetStorageNode())
    scene.RemoveNode(node)


def add_slice_view(
    ctx: SceneContext,
    volume_node: vtkMRMLVolumeNode,
    name: str = "Red",
    orientation: str = "Axial",
    size: Sequence[int] = (512, 512),
) -> vtkMRMLSliceLogic:
    """A slice view (logic + node) showing ``volume_node`` as background, fitted to the volume like Slicer does."""
    import slicer

    sl = slicer.vtkMRMLSliceLogic()
    sl.SetMRMLApplicationLogic(ctx.app_logic)
    sl.SetMRMLScene(ctx.scene)
    ctx.app_logic.GetSliceLogics().AddItem(sl)
    sn = sl.AddSliceNode(name)
    sn.SetOrientation(orientation)
    sl.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
    sn.SetDimensions(int(size[0]), int(size[1]), 1)
    sl.FitSliceToAll()
    ctx.slice_logics[name] = sl
    return sl


def volume_of(slice_logic: vtkMRMLSliceLogic) -> Optional[vtkMRMLVolumeNode]:
    """The background volume node shown by a slice logic (None when the view is empty)."""
    comp = slice_logic.GetSliceCompositeNode()
    vid = comp.GetBackgroundVolumeID() if comp is not None else None
    return slice_logic.GetMRMLScene().GetNodeByID(vid) if vid else None


def save_mrb(ctx: SceneContext, path: str) -> str:
    path = os.path.abspath(os.fspath(path))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = os.path.join(tmp, os.path.splitext(os.path.basename(path))[0])
        os.makedirs(bundle)
        if not ctx.app_logic.SaveSceneToSlicerDataBundleDirectory(bundle, None):
            raise OSError(f"could not write the scene bundle for {path}")
        if os.path.exists(path):
            os.remove(path)
        if not ctx.app_logic.Zip(path, bundle):
            raise OSError(f"could not write {path}")
    return path


def open_mrb(path: str, work_dir: Optional[str] = None) -> SceneContext:
    ctx = create_scene()
    work_dir = work_dir or tempfile.mkdtemp(prefix="mrb-")
    os.makedirs(work_dir, exist_ok=True)
    if not ctx.app_logic.OpenSlicerDataBundle(os.fspath(path), work_dir):
        raise OSError(f"could not open {path}")
    return ctx


def close(ctx: SceneContext) -> None:
    """Release in a fixed order: slice logics, module logics, then the scene."""
    for sl in ctx.slice_logics.values():
        sl.SetMRMLScene(None)
    ctx.slice_logics.clear()
    ctx.app_logic.GetSliceLogics().RemoveAllItems()
    for logic in (ctx.subject_hierarchy_logic, ctx.markups_logic, ctx.volumes_logic, ctx.colors_logic):
        logic.SetMRMLScene(None)
    ctx.app_logic.SetMRMLScene(None)
    ctx.scene.Clear(1)
