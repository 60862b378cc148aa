"""Offscreen render of a slice view through Slicer's own displayable managers (markups drawn by Slicer itself).

As in Slicer's slice views, the slice image is drawn by its own renderer on layer 0 and the displayable managers
draw on layer 1 above it, so a box's translucent fill blends with the tissue under it (the stored fill opacity)
instead of replacing it. The box labels (each ROI's name, as Slicer labels it) are placed by this module inside the
view, beside their box, without overlapping one another; Slicer's own label, drawn at a fixed place beside the box,
is hidden for the render and restored afterwards (the scene is left as it was).

Needs an OpenGL context: with no display, set ``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow`` (Mesa EGL works).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # Slicer's MRML classes; without stubs, mypy sees them as Any
    from slicer import vtkMRMLSliceLogic, vtkSlicerApplicationLogic

_MANAGERS = (
    "vtkMRMLVolumeGlyphSliceDisplayableManager",
    "vtkMRMLModelSliceDisplayableManager",
    "vtkMRMLCrosshairDisplayableManager",
    "vtkMRMLOrientationMarkerDisplayableManager",
    "vtkMRMLRulerDisplayableManager",
    "vtkMRMLSegmentationsDisplayableManager2D",
    "vtkMRMLMarkupsDisplayableManager",
    "vtkMRMLTransformsDisplayableManager2D",
)

LABEL_FONT_PX = 14  # readable on a 512 px view
LABEL_MARGIN_PX = 3  # from the view's edges and between a box and its label
LABEL_GAP_PX = 2  # between two labels

Rect = tuple[float, float, float, float]  # x0, y0, x1, y1 in view pixels, origin top-left, y down


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def wrap_label(text: str, max_width: float, width_of: Callable[[str], float]) -> list[str]:
    """Split ``text`` at spaces into lines no wider than ``max_width`` (a single word wider than that stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and width_of(lines[-1] + " " + word) <= max_width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def place_labels(boxes: Sequence[Rect], sizes: Sequence[tuple[float, float]], view_size: tuple[int, int]) -> list[Rect]:
    """Where each box's label goes: beside its box (right, left, above, below, in that order of preference), inside
    the view, over no other label and, where possible, over no box. Boxes and the result are in view pixels with
    the origin at the top left."""
    vw, vh = view_size
    m, gap = LABEL_MARGIN_PX, LABEL_GAP_PX
    placed: list[Rect] = []
    for (x0, y0, x1, y1), (w, h) in zip(boxes, sizes, strict=True):

        def clamp(x: float, y: float, w: float = w, h: float = h) -> Rect:
            x = min(max(x, m), max(m, vw - m - w))
            y = min(max(y, m), max(m, vh - m - h))
            return (x, y, x + w, y + h)

        beside = [clamp(x1 + m, y0), clamp(x0 - m - w, y0), clamp(x0, y0 - m - h), clamp(x0, y1 + m)]
        # then the same places moved down and up a line at a time, for crowded views
        steps = [k * (h + gap) for i in range(1, int(vh // (h + gap)) + 1) for k in (i, -i)]
        shifted = [clamp(r[0], r[1] + d) for d in steps for r in beside]
        free = [r for r in beside + shifted if not any(_overlaps(r, p) for p in placed)]
        clear = [r for r in free if not any(_overlaps(r, b) for b in boxes)]
        placed.append((clear or free or beside)[0])
    return placed


def _roi_labels(scene, slice_node) -> list[tuple[Any, Rect, str]]:
    """The ROIs this slice cuts whose label Slicer would draw: (display node, box in view pixels, name)."""
    xy_to_ras = np.array([[slice_node.GetXYToRAS().GetElement(i, j) for j in range(4)] for i in range(4)])
    ras_to_xy = np.linalg.inv(xy_to_ras)
    vh = slice_node.GetDimensions()[1]
    out = []
    rois = scene.GetNodesByClass("vtkMRMLMarkupsROINode")
    for i in range(rois.GetNumberOfItems()):
        roi = rois.GetItemAsObject(i)
        d = roi.GetDisplayNode()
        if d is None or not d.GetVisibility() or not d.GetVisibility2D() or not d.GetPropertiesLabelVisibility():
            continue
        if not d.IsDisplayableInView(slice_node.GetID()):
            continue
        b = [0.0] * 6
        roi.GetObjectBounds(b)
        m = roi.GetObjectToWorldMatrix()
        o2w = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
        corners = np.array([[x, y, z, 1.0] for x in b[0:2] for y in b[2:4] for z in b[4:6]])
        xy = (ras_to_xy @ o2w @ corners.T).T
        if not xy[:, 2].min() <= 0.0 <= xy[:, 2].max():
            continue  # the slice does not cut this ROI
        box = (xy[:, 0].min(), vh - xy[:, 1].max(), xy[:, 0].max(), vh - xy[:, 1].min())
        out.append((d, box, roi.GetName()))
    return out


def render_slice_view(
    app_logic: vtkSlicerApplicationLogic,
    slice_logic: vtkMRMLSliceLogic,
    path_png: str,
    size: tuple[int, int] = (512, 512),
) -> str:
    """Render ``slice_logic``'s view (image + markups) to a PNG file. The view keeps its field of view; its pixel
    dimensions become ``size`` for the render."""
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    import slicer
    import vtk

    w, h = int(size[0]), int(size[1])
    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(app_logic)
    for dm in _MANAGERS:
        if not factory.IsDisplayableManagerRegistered(dm):
            factory.RegisterDisplayableManager(dm)
    image_ren = vtk.vtkRenderer()  # layer 0: the slice image
    ren = vtk.vtkRenderer()  # layer 1: what the displayable managers draw, blended over the image
    ren.SetLayer(1)
    ren.GetActiveCamera().ParallelProjectionOn()
    rw = vtk.vtkRenderWindow()
    rw.SetOffScreenRendering(1)
    rw.ShowWindowOff()
    rw.SetSize(w, h)
    rw.SetNumberOfLayers(2)
    rw.AddRenderer(image_ren)
    rw.AddRenderer(ren)
    iren = vtk.vtkRenderWindowInteractor()
    iren.SetRenderWindow(rw)
    iren.Initialize()
    slice_node = slice_logic.GetSliceNode()
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, ren)
    group.SetMRMLDisplayableNode(slice_node)
    mapper = vtk.vtkImageMapper()
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    image_ren.AddViewProp(actor)
    slice_logic.ResizeSliceNode(w, h)
    mapper.SetInputConnection(slice_logic.GetImageDataConnection())
    labels = _roi_labels(slice_node.GetScene(), slice_node)
    for d, _, _ in labels:
        d.SetPropertiesLabelVisibility(False)
    try:
        _add_labels(ren, labels, (w, h))
        rw.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(rw)
        grab.ReadFrontBufferOff()
        grab.Update()
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(os.fspath(path_png))
        writer.SetInputConnection(grab.GetOutputPort())
        writer.Write()
    finally:
        for d, _, _ in labels:
            d.SetPropertiesLabelVisibility(True)
        mapper.SetInputConnection(None)
        group.SetMRMLDisplayableNode(None)
        ren.RemoveAllViewProps()
        image_ren.RemoveAllViewProps()
        rw.Finalize()
    return os.fspath(path_png)


def _add_labels(ren, labels, view_size: tuple[int, int]) -> None:
    """One text actor per label, in the ROI's colour on a dark translucent backing, where ``place_labels`` puts it."""
    import vtk

    if not labels:
        return
    measure = vtk.vtkTextRenderer()

    def prop(color) -> vtk.vtkTextProperty:
        tp = vtk.vtkTextProperty()
        tp.SetFontSize(LABEL_FONT_PX)
        tp.BoldOn()
        tp.SetColor(*color)
        tp.SetBackgroundColor(0.0, 0.0, 0.0)
        tp.SetBackgroundOpacity(0.55)
        tp.SetJustificationToLeft()
        tp.SetVerticalJustificationToBottom()
        return tp

    def extent(tp, text: str) -> tuple[float, float]:
        bb = [0, 0, 0, 0]
        measure.GetBoundingBox(tp, text, bb, 72)
        return float(bb[1] - bb[0] + 1), float(bb[3] - bb[2] + 1)

    texts, sizes, props = [], [], []
    for d, _, name in labels:
        tp = prop(d.GetColor())

        def width_of(s: str, tp: vtk.vtkTextProperty = tp) -> float:
            return extent(tp, s)[0]

        text = "\n".join(wrap_label(name, view_size[0] - 2 * LABEL_MARGIN_PX, width_of))
        texts.append(text)
        sizes.append(extent(tp, text))
        props.append(tp)
    rects = place_labels([b for _, b, _ in labels], sizes, view_size)
    for text, tp, (x0, _, _, y1) in zip(texts, props, rects, strict=True):
        a = vtk.vtkTextActor()
        a.SetInput(text)
        a.SetTextProperty(tp)
        a.SetDisplayPosition(int(round(x0)), int(round(view_size[1] - y1)))
        ren.AddActor2D(a)
