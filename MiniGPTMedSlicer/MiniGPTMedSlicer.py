import os
import shutil
import sys
import time
from typing import Annotated, Dict, Optional

import qt
import slicer
import vtk
from MiniGPTMedSlicerLib.local_backend import LocalBackend, find_launcher, find_or_start_backend
from MiniGPTMedSlicerLib.logic import TASK_LABELS, AnalysisLogic
from MiniGPTMedSlicerQt.qt_compat import prop
from slicer import vtkMRMLMarkupsROINode
from slicer.parameterNodeWrapper import Choice, SlicerParameterNamePropertyName, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#
# MiniGPTMedSlicer
#


class MiniGPTMedSlicer(ScriptedLoadableModule):
    """Ask a vision-language model about the slice in view and see its findings as markups in place."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MiniGPT-Med"
        self.parent.categories = ["AI"]
        self.parent.dependencies = []
        self.parent.contributors = ["MiniGPTMedSlicer authors"]
        self.parent.helpText = (
            "Sends the slice shown in a view (as displayed: resliced, windowed) to a MiniGPTMedSlicer backend and shows "
            "the findings text and detection boxes as ROI markups in patient space. Only pixels, pixel spacing and "
            "modality leave Slicer. Start a backend with <code>minigptmed-backend serve</code>; the built-in engine "
            "finds rule-based candidates and is not a diagnosis."
        )
        self.parent.acknowledgementText = (
            "MiniGPT-Med (Alkhaldi et al.) builds on MiniGPT-v2 (Vision-CAIR). The Slicer module layout follows Slicer's "
            "scripted-module template."
        )


#
# MiniGPTMedSlicerParameterNode
#


@parameterNodeWrapper
class MiniGPTMedSlicerParameterNode:
    """What the user sets in the panel, saved with the scene. The Widget binds it to the panel's widgets."""

    view: Annotated[str, Choice(["Red", "Yellow", "Green"])] = "Red"
    task: Annotated[str, Choice(list(TASK_LABELS))] = "Detect"
    question: str = ""
    regionRoi: vtkMRMLMarkupsROINode
    sweepRange: str = ""
    keepResults: bool = True


#
# MiniGPTMedSlicerWidget
#

# parameter -> the panel widget it is bound to (through the SlicerParameterName property, as in Slicer's template)
_BOUND_WIDGETS = {
    "view": "view_combo",
    "task": "task_combo",
    "question": "question_edit",
    "sweepRange": "range_edit",
    "keepResults": "keep_check",
}


class MiniGPTMedSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: puts the panel (MiniGPTMedSlicerQt.panel) in the module, hands it the Logic and binds the parameter
    node to its widgets."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        from MiniGPTMedSlicerQt.panel import Panel

        self.logic = MiniGPTMedSlicerLogic()
        container = qt.QWidget()
        container.setLayout(qt.QVBoxLayout())
        container.layout().setContentsMargins(0, 0, 0, 0)
        self.layout.addWidget(container)
        self.panel = Panel(
            self.logic,
            parent=container,
            settings=qt.QSettings(),
            error_display=lambda msg: slicer.util.errorDisplay(msg, windowTitle="MiniGPT-Med"),
        )
        self.layout.addStretch(1)
        for parameter, attribute in _BOUND_WIDGETS.items():
            getattr(self.panel, attribute).setProperty(SlicerParameterNamePropertyName, parameter)
        # the Region ROI list is filled by the panel (user-drawn ROIs only), so it is synced here rather than bound
        self.panel.region_combo.currentIndexChanged.connect(self.onRegionChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self.setParameterNode(None)
        if self.panel is not None:
            self.panel.cleanup()

    def enter(self) -> None:
        self.initializeParameterNode()
        if self.panel is not None:
            self.panel.refresh_regions()
            self.panel.refresh_table()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self.panel is not None:
            self.panel.on_cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
        if self.panel is not None:
            self.panel.refresh_table()
            self.panel.restore_conversation()  # none left: the transcript is cleared

    def onSceneEndImport(self, caller, event) -> None:
        # a scene loaded (e.g. an .mrb): its analyses in the table, the conversation saved with the newest one
        if self.panel is not None:
            self.panel.refresh_table()
            self.panel.restore_conversation()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        # a newly drawn ROI appears in the Region ROI list (deferred: the node is not named yet while it is added)
        if self.panel is not None and node is not None and node.IsA("vtkMRMLMarkupsROINode"):
            qt.QTimer.singleShot(0, self.panel.refresh_regions)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        if self.panel is not None and node is not None and node.IsA("vtkMRMLMarkupsROINode"):
            qt.QTimer.singleShot(0, self.panel.refresh_table)
            qt.QTimer.singleShot(0, self.panel.refresh_regions)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = parameterNode
        if self._parameterNode is not None:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.panel.widget)
            roi = self._parameterNode.regionRoi
            index = self.panel.region_combo.findData(roi.GetID()) if roi is not None else -1
            if index >= 0:
                self.panel.region_combo.setCurrentIndex(index)

    def onRegionChanged(self, *args) -> None:
        if self._parameterNode is not None:
            nodeId = prop(self.panel.region_combo, "currentData")
            self._parameterNode.regionRoi = slicer.mrmlScene.GetNodeByID(nodeId) if nodeId else None


#
# MiniGPTMedSlicerLogic
#


class MiniGPTMedSlicerLogic(AnalysisLogic, ScriptedLoadableModuleLogic):
    """The module's logic (MiniGPTMedSlicerLib.logic.AnalysisLogic) on the application's scene and slice views, with
    its parameter node. Usable without the Widget (Python console, scripts, the self-test)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        AnalysisLogic.__init__(self, slicer.mrmlScene, self.sliceLogics, instance_file=self.instanceFile)
        self.add_to_dicom_database = self.addToDicomDatabase if _dicomlib_available() else None

    @staticmethod
    def instanceFile(uid: str) -> Optional[str]:
        """The file of a DICOM instance in the application's DICOM database (the SR export references the series
        a volume was loaded from: its ``DICOM.instanceUIDs``)."""
        db = getattr(slicer, "dicomDatabase", None)
        path = db.fileForInstance(uid) if db is not None else ""
        return str(path) if path else None

    @staticmethod
    def addToDicomDatabase(path: str) -> str:
        """Import an exported SR into the application's DICOM database (a copy), from where the DICOM module sends
        it to a PACS. Needs the Slicer application: not run by the test suite (see docs/review-export.md)."""
        import tempfile

        from DICOMLib import DICOMUtils

        with tempfile.TemporaryDirectory() as folder:
            shutil.copy(path, folder)
            DICOMUtils.importDicom(folder, slicer.dicomDatabase, copyFiles=True)
        return "the SR is in Slicer's DICOM database"

    def getParameterNode(self):
        return MiniGPTMedSlicerParameterNode(super().getParameterNode())

    @staticmethod
    def sliceLogics() -> Dict[str, object]:
        lm = slicer.app.layoutManager()
        if lm is None:
            return {}
        return {name: lm.sliceWidget(name).sliceLogic() for name in lm.sliceViewNames()}

    def process_events(self) -> None:
        slicer.app.processEvents()


def _dicomlib_available() -> bool:
    try:
        import DICOMLib  # noqa: F401
    except ImportError:
        return False
    return getattr(slicer, "dicomDatabase", None) is not None


#
# MiniGPTMedSlicerTest
#


class MiniGPTMedSlicerTest(ScriptedLoadableModuleTest):
    """Analyzes a synthetic volume through the Logic and through the module's panel, and checks the ROIs.

    The backend is one serving the built-in engine at the default URL, or one this test starts on a free loopback port
    (MiniGPTMedSlicerLib.local_backend): ``PythonSlicer -m backend.cli serve --engine builtin`` when Slicer's Python
    can import the ``backend`` package with FastAPI and uvicorn (this repository, or installed with ``PythonSlicer -m
    pip install -e <repository>``), else the ``minigptmed-backend`` script from ``$MINIGPTMED_BACKEND``, PATH or the
    repository's ``.venv``. With neither, the test says so and is skipped.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AnalyzeWithBuiltinBackend()
        self.setUp()
        self.test_PanelInModuleWidget()

    @staticmethod
    def _backend() -> Optional[LocalBackend]:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        exe = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        python = shutil.which("PythonSlicer") or os.path.join(slicer.app.slicerHome, "bin", exe)
        venvScript = os.path.join(root, ".venv", "Scripts" if os.name == "nt" else "bin", "minigptmed-backend")
        launcher = find_launcher(
            python if os.path.exists(python) else sys.executable, (os.environ.get("MINIGPTMED_BACKEND"), venvScript)
        )
        return find_or_start_backend(launcher, engine="builtin", cwd=root)

    @staticmethod
    def _loadTestVolume():
        """A synthetic CT in HU (air, soft tissue, a lung field, a bone) with one solid nodule, in all slice views."""
        import numpy as np

        zz, yy, xx = np.mgrid[:40, :128, :128]
        arr = np.where((yy - 64) ** 2 + (xx - 64) ** 2 < 55**2, 40, -1000).astype(np.int16)
        arr[(yy - 55) ** 2 + (xx - 64) ** 2 < 40**2] = -860
        arr[(yy - 110) ** 2 + (xx - 64) ** 2 < 6**2] = 700
        arr[(zz - 20) ** 2 + (yy - 50) ** 2 + (xx - 70) ** 2 < 8**2] = 30
        volume = slicer.util.addVolumeFromArray(arr, name="MiniGPTMedTestVolume")
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        red = slicer.app.layoutManager().sliceWidget("Red").sliceLogic()
        red.SetSliceOffset(20.0 + volume.GetOrigin()[2])
        return volume

    def test_AnalyzeWithBuiltinBackend(self):
        backend = self._backend()
        if backend is None:
            self.delayDisplay("No backend (see the class docstring). Skipped.")
            return
        with backend:
            self._loadTestVolume()
            logic = MiniGPTMedSlicerLogic()
            logic.configure(backend.url, None)
            outcome = logic.analyze("Red", "Detect")
            self.assertTrue(outcome.ok, outcome.message)
            self.assertGreaterEqual(outcome.n_findings, 1)
            rois = slicer.util.getNodesByClass("vtkMRMLMarkupsROINode")
            self.assertEqual(len(rois), outcome.n_findings)
            self.delayDisplay(f"Logic test passed: {outcome.message}")

    def test_PanelInModuleWidget(self):
        """The real module widget in the running app: Analyze from the panel, the table fills, a row click selects."""
        backend = self._backend()
        if backend is None:
            self.delayDisplay("No backend (see the class docstring). Skipped.")
            return
        with backend:
            self._loadTestVolume()
            slicer.util.selectModule("MiniGPTMedSlicer")
            widget = slicer.modules.minigptmedslicer.widgetRepresentation().self()
            panel = widget.panel
            panel.url_edit.setText(backend.url)
            panel.view_combo.setCurrentIndex(panel.view_combo.findText("Red"))
            panel.task_combo.setCurrentIndex(panel.task_combo.findText("Detect"))
            panel.on_analyze()
            self.assertIsNotNone(panel.job, prop(panel.status_label, "text"))
            deadline = time.time() + 120.0
            while panel.job is not None and time.time() < deadline:
                slicer.app.processEvents()
                time.sleep(0.02)
            self.assertIsNone(panel.job, "the analysis did not finish within 120 s")
            rows = prop(panel.table, "rowCount")
            self.assertGreaterEqual(rows, 1, prop(panel.status_label, "text"))
            nodeId = panel.table.item(0, 0).data(qt.Qt.UserRole)
            panel.on_row_clicked(0, 0)
            self.assertTrue(slicer.mrmlScene.GetNodeByID(nodeId).GetSelected())
            self.assertEqual(widget.logic.getParameterNode().task, "Detect")
            panel.on_clear()
            self.assertEqual(len(slicer.util.getNodesByClass("vtkMRMLMarkupsROINode")), 0)
            self.delayDisplay("Panel test passed")
