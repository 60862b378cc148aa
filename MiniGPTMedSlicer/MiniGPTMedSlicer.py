import logging
import os
import shutil
import socket
import subprocess
import sys
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
        self.panel = Panel(
            self.logic.controller,
            parent=container,
            settings=qt.QSettings(),
            error_display=lambda msg: slicer.util.errorDisplay(msg, windowTitle="MiniGPT-Med"),
        )
        self.layout.addStretch(1)
        self.panel.view_combo.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.panel.task_combo.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.panel.question_edit.editingFinished.connect(self.updateParameterNodeFromGUI)
        self.panel.keep_check.toggled.connect(self.updateParameterNodeFromGUI)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
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

    def analyze(
        self,
        view: str = "Red",
        taskName: str = "Detect",
        question: str = "",
        backendUrl: Optional[str] = None,
        token: Optional[str] = None,
        keepPrevious: bool = True,
        timeoutS: float = 300.0,
    ) -> Outcome:
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
    """Starts a backend with the built-in engine on a free loopback port, analyzes a synthetic volume through the Logic
    and through the module's panel, and checks the ROIs.

    The backend needs FastAPI and uvicorn. It is started as ``PythonSlicer -m backend.cli serve --engine builtin
    --port <free>`` when Slicer's Python can import the ``backend`` package (from this repository or installed with
    ``PythonSlicer -m pip install -e <repository>``); otherwise with the ``minigptmed-backend`` script from
    ``$MINIGPTMED_BACKEND``, PATH or the repository's ``.venv``. With neither, the test says so and is skipped.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AnalyzeWithBuiltinBackend()
        self.setUp()
        self.test_PanelInModuleWidget()

    @staticmethod
    def _repositoryRoot():
        return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    @classmethod
    def _backendCommand(cls, port):
        """The command line that serves the built-in engine on ``port``, and the folder to run it in (or None, None)."""
        import importlib.util

        root = cls._repositoryRoot()
        serve = ["serve", "--engine", "builtin", "--host", "127.0.0.1", "--port", str(port)]
        haveBackend = importlib.util.find_spec("backend.cli") is not None or os.path.isfile(
            os.path.join(root, "backend", "cli.py")
        )
        haveServer = all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn"))
        if haveBackend and haveServer:
            exe = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
            pythonSlicer = shutil.which("PythonSlicer") or os.path.join(slicer.app.slicerHome, "bin", exe)
            if not os.path.exists(pythonSlicer):
                pythonSlicer = sys.executable
            return [pythonSlicer, "-m", "backend.cli", *serve], root
        venvScript = os.path.join(root, ".venv", "Scripts" if os.name == "nt" else "bin", "minigptmed-backend")
        for script in (os.environ.get("MINIGPTMED_BACKEND"), shutil.which("minigptmed-backend"), venvScript):
            if script and os.path.exists(script):
                return [script, *serve], root
        return None, None

    def _startBackend(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command, cwd = self._backendCommand(port)
        if command is None:
            return None, None
        logging.info("Starting the test backend: " + " ".join(command))
        proc = subprocess.Popen(command, cwd=cwd)
        url = f"http://127.0.0.1:{port}"
        probe = AnalysisController(slicer.mrmlScene, dict)
        probe.configure(url, None)
        deadline = time.time() + 60.0
        while time.time() < deadline:
            try:
                probe.client().health(retries=0)
                return proc, url
            except Exception:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"The test backend exited with code {proc.returncode}: {' '.join(command)}"
                    ) from None
                time.sleep(0.2)
        proc.terminate()
        raise RuntimeError(f"The test backend did not answer at {url} within 60 s")

    @staticmethod
    def _stopBackend(proc):
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    @staticmethod
    def _loadTestVolume():
        """A synthetic CT-like volume with one bright sphere, shown in all slice views."""
        import numpy as np

        zz, yy, xx = np.mgrid[:40, :128, :128]
        arr = np.where((yy - 64) ** 2 + (xx - 64) ** 2 < 55**2, 100, 0).astype(np.int16)
        arr[(zz - 20) ** 2 + (yy - 50) ** 2 + (xx - 70) ** 2 < 8**2] = 180
        volume = slicer.util.addVolumeFromArray(arr, name="MiniGPTMedTestVolume")
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        red = slicer.app.layoutManager().sliceWidget("Red").sliceLogic()
        red.SetSliceOffset(20.0 + volume.GetOrigin()[2])
        return volume

    def test_AnalyzeWithBuiltinBackend(self):
        proc, url = self._startBackend()
        if proc is None:
            self.delayDisplay(
                "No backend: install the repository into Slicer's Python or set MINIGPTMED_BACKEND to the "
                "minigptmed-backend script. Skipped."
            )
            return
        try:
            self._loadTestVolume()
            logic = MiniGPTMedSlicerLogic()
            outcome = logic.analyze("Red", "Detect", backendUrl=url)
            self.assertTrue(outcome.ok, outcome.message)
            self.assertGreaterEqual(outcome.n_findings, 1)
            rois = slicer.util.getNodesByClass("vtkMRMLMarkupsROINode")
            self.assertEqual(len(rois), outcome.n_findings)
            self.delayDisplay(f"Logic test passed: {outcome.message}")
        finally:
            self._stopBackend(proc)

    def test_PanelInModuleWidget(self):
        """The real module widget in the running app: Analyze from the panel, the table fills, a row click selects."""
        proc, url = self._startBackend()
        if proc is None:
            self.delayDisplay("No backend (see the class docstring). Skipped.")
            return
        try:
            self._loadTestVolume()
            slicer.util.selectModule("MiniGPTMedSlicer")
            widget = slicer.modules.minigptmedslicer.widgetRepresentation().self()
            panel = widget.panel
            panel.url_edit.setText(url)
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
        finally:
            self._stopBackend(proc)
