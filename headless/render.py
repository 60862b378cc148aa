"""Offscreen render of a slice view through Slicer's own displayable managers (markups drawn by Slicer itself).

Needs an OpenGL context: with no display, set ``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow`` (Mesa EGL works).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

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
    ren = vtk.vtkRenderer()
    ren.GetActiveCamera().ParallelProjectionOn()
    rw = vtk.vtkRenderWindow()
    rw.SetOffScreenRendering(1)
    rw.ShowWindowOff()
    rw.SetSize(w, h)
    rw.AddRenderer(ren)
    iren = vtk.vtkRenderWindowInteractor()
    iren.SetRenderWindow(rw)
    iren.Initialize()
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, ren)
    group.SetMRMLDisplayableNode(slice_logic.GetSliceNode())
    mapper = vtk.vtkImageMapper()
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    actor.GetProperty().SetDisplayLocationToBackground()
    ren.AddViewProp(actor)
    slice_logic.ResizeSliceNode(w, h)
    mapper.SetInputConnection(slice_logic.GetImageDataConnection())
    try:
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
        mapper.SetInputConnection(None)
        group.SetMRMLDisplayableNode(None)
        ren.RemoveAllViewProps()
        rw.Finalize()
    return os.fspath(path_png)
