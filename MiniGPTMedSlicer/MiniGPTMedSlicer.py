import logging
import os
import shutil
import socket
import subprocess
import time
from typing import Annotated, Dict, Optional

import qt
import slicer
import vtk
from MiniGPTMedSlicerLib.controller import TASKS, AnalysisController, Outcome
from MiniGPTMedSlicerQt.qt_compat import prop
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
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
            "finds rule-based candidates and is not a diagnosis.")
        self.parent.acknowledgementText = (
            "MiniGPT-Med (Alkhaldi et al.) builds on MiniGPT-v2 (Vision-CAIR). The Slicer module layout follows Slicer's "
            "scripted-module template.")


#
# MiniGPTMedSlicerParameterNode
#


@parameterNodeWrapper
class MiniGPTMedSlicerParameterNode:
    view: Annotated[str, Choice(["Red", "Yellow", "Green"])] = "Red"
    task: Annotated[str, Choice(list(TASKS))] = "Detect"
    question: str = ""
    keepResults: bool = True


#
# MiniGPTMedSlicerWidget
#


class MiniGPTMedSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """A thin shell: the panel (MiniGPTMedSlicerQt.panel) does the GUI, the controller does the work."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
        self._parameterNode = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        from MiniGPTMedSlicerQt.panel import Panel

        self.logic = MiniGPTMedSlicerLogic()
        container = qt.QWidget()
        container.setLayout(qt.QVBoxLayout())
        container.layout().setContentsMargins(0, 0, 0, 0)
        self.layout.addWidget(container)
        self.panel = Panel(self.logic.controller, parent=container, settings=qt.QSettings(),
                           error_display=lambda msg: slicer.util.errorDisplay(msg, windowTitle="MiniGPT-Med"))
        self.layout.addStretch(1)
        self.panel.view_combo.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.panel.task_combo.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.panel.question_edit.editingFinished.connect(self.updateParameterNodeFromGUI)
        self.panel.keep_check.toggled.connect(self.updateParameterNodeFromGUI)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.panel is not None:
            self.panel.cleanup()

    def enter(self) -> None:
        self.initializeParameterNode()
        if self.panel is not None:
            self.panel.refresh_regions()
            self.panel.refresh_table()

    def onSceneStartClose(self, caller, event) -> None:
        if self.panel is not None:
            self.panel.on_cancel()
        self._parameterNode = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
        if self.panel is not None:
            self.panel.refresh_table()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        if self.panel is not None and node is not None and node.IsA("vtkMRMLMarkupsROINode"):
            qt.QTimer.singleShot(0, self.panel.refresh_table)

    def initializeParameterNode(self) -> None:
        self._parameterNode = self.logic.getParameterNode()
        p = self._parameterNode
        self.panel.view_combo.setCurrentIndex(max(0, self.panel.view_combo.findText(p.view)))
        self.panel.task_combo.setCurrentIndex(max(0, self.panel.task_combo.findText(p.task)))
        self.panel.question_edit.setText(p.question)
        self.panel.keep_check.setChecked(p.keepResults)

    def updateParameterNodeFromGUI(self, *args) -> None:
        if self._parameterNode is None:
            return
        p = self._parameterNode
        p.view = str(prop(self.panel.view_combo, "currentText"))
        p.task = str(prop(self.panel.task_combo, "currentText"))
        p.question = str(prop(self.panel.question_edit, "text"))
        p.keepResults = bool(prop(self.panel.keep_check, "checked"))


#
# MiniGPTMedSlicerLogic
#


class MiniGPTMedSlicerLogic(ScriptedLoadableModuleLogic):
    """Usable without the Widget (Python console, scripts, the self-test)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.controller = AnalysisController(slicer.mrmlScene, self.sliceLogics)

    def getParameterNode(self):
        return MiniGPTMedSlicerParameterNode(super().getParameterNode())

    @staticmethod
    def sliceLogics() -> Dict[str, object]:
        lm = slicer.app.layoutManager()
        if lm is None:
            return {}
        return {name: lm.sliceWidget(name).sliceLogic() for name in lm.sliceViewNames()}

    def analyze(self, view: str = "Red", taskName: str = "Detect", question: str = "", backendUrl: Optional[str] = None,
                token: Optional[str] = None, keepPrevious: bool = True, timeoutS: float = 300.0) -> Outcome:
        """Run one analysis and wait for it, processing events meanwhile (for scripts and tests)."""
        if backendUrl:
            self.controller.configure(backendUrl, token)
        startTime = time.time()
        job = self.controller.start(view, taskName, question)
        while not job.done.wait(0.02):
            slicer.app.processEvents()
            if time.time() - startTime > timeoutS:
                job.cancel.set()
                break
        outcome = self.controller.finish(job, keep_previous=keepPrevious)
        logging.info(f"MiniGPT-Med {taskName} on {view}: {outcome.message} ({time.time() - startTime:.2f} s)")
        return outcome


#
# MiniGPTMedSlicerTest
#


class MiniGPTMedSlicerTest(ScriptedLoadableModuleTest):
    """Starts a backend with the built-in engine on a free port, analyzes a synthetic volume, checks the ROIs."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AnalyzeWithBuiltinBackend()

    @staticmethod
    def _backendCommand():
        """The backend runs outside Slicer's Python (it needs FastAPI): $MINIGPTMED_BACKEND, the console script on PATH,
        or the repository's .venv."""
        here = os.path.dirname(os.path.abspath(__file__))
        candidates = [os.environ.get("MINIGPTMED_BACKEND"), shutil.which("minigptmed-backend"),
                      os.path.join(here, "..", ".venv", "bin", "minigptmed-backend")]
        for c in candidates:
            if c and os.path.exists(c):
                return c
        return None

    def test_AnalyzeWithBuiltinBackend(self):
        import numpy as np

        command = self._backendCommand()
        if command is None:
            self.delayDisplay("No backend found: set MINIGPTMED_BACKEND to the minigptmed-backend script. Skipped.")
            return
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([command, "serve", "--engine", "builtin", "--port", str(port)])
        try:
            logic = MiniGPTMedSlicerLogic()
            url = f"http://127.0.0.1:{port}"
            logic.controller.configure(url, None)
            for _ in range(300):
                try:
                    logic.controller.client().health(retries=0)
                    break
                except Exception:
                    time.sleep(0.1)
            zz, yy, xx = np.mgrid[:40, :128, :128]
            arr = np.where((yy - 64) ** 2 + (xx - 64) ** 2 < 55**2, 100, 0).astype(np.int16)
            arr[(zz - 20) ** 2 + (yy - 50) ** 2 + (xx - 70) ** 2 < 8**2] = 180
            volume = slicer.util.addVolumeFromArray(arr, name="MiniGPTMedTestVolume")
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
            red = slicer.app.layoutManager().sliceWidget("Red").sliceLogic()
            red.SetSliceOffset(20.0 + volume.GetOrigin()[2])
            outcome = logic.analyze("Red", "Detect")
            self.assertTrue(outcome.ok, outcome.message)
            rois = slicer.util.getNodesByClass("vtkMRMLMarkupsROINode")
            self.assertGreaterEqual(len(rois), 1)
            self.delayDisplay(f"Test passed: {outcome.message}")
        finally:
            proc.terminate()
            proc.wait(10)
