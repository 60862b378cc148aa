"""The MiniGPT-Med panel: the .ui form wired to the module's logic (:class:`MiniGPTMedSlicerLib.logic.AnalysisLogic`).

Runs in Slicer (PythonQt) and under PySide6 offscreen (tests). The HTTP calls run on Qt's asynchronous network
access manager (:mod:`.qt_transport`: no Python thread, so nothing waits for the GIL that Slicer's main thread
keeps); a QTimer on the main thread shows progress, and the results are applied on the main thread (MRML too).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib.logic import SWEEP_LABEL, TASK_LABELS, AnalysisError, AnalysisLogic, Job, describe_error

from .qt_compat import find, font_metrics, is_gui_thread, load_ui, prop, qt, to_str
from .qt_transport import QtRunner

UI_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "UI", "MiniGPTMedSlicer.ui"
)
SETTINGS_PREFIX = "MiniGPTMedSlicer/"
POLL_MS = 50


class Panel:
    """Composes the form into ``parent`` (a QWidget with a layout, or None for a top-level widget). ``logic``: the
    module's Logic in Slicer, an :class:`AnalysisLogic` on a slicer-core scene outside it."""

    def __init__(
        self,
        logic: AnalysisLogic,
        parent=None,
        settings=None,
        error_display: Optional[Callable[[str], None]] = None,
        runner: Optional[Any] = None,
    ):
        self.logic = logic
        self.settings = settings
        self.error_display = error_display  # e.g. slicer.util.errorDisplay in Slicer; None: status label only
        self.widget = load_ui(UI_PATH)
        if parent is not None and parent.layout() is not None:
            parent.layout().addWidget(self.widget)
        w = self.widget
        self.url_edit = find(w, "backendUrlLineEdit")
        self.token_edit = find(w, "tokenLineEdit")
        self.test_button = find(w, "testConnectionButton")
        self.connection_label = find(w, "connectionStatusLabel")
        self.view_combo = find(w, "viewComboBox")
        self.task_combo = find(w, "taskComboBox")
        self.question_edit = find(w, "questionLineEdit")
        self.region_combo = find(w, "regionComboBox")
        self.range_edit = find(w, "sweepRangeLineEdit")
        self.keep_check = find(w, "keepResultsCheckBox")
        self.analyze_button = find(w, "analyzeButton")
        self.cancel_button = find(w, "cancelButton")
        self.progress = find(w, "progressBar")
        self.status_label = find(w, "statusLabel")
        self.text_edit = find(w, "findingsTextEdit")
        self.table = find(w, "findingsTable")
        self.clear_button = find(w, "clearResultsButton")

        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, qt.QHeaderView.Stretch)
        for col in range(1, prop(self.table, "columnCount")):
            header.setSectionResizeMode(col, qt.QHeaderView.ResizeToContents)
        rows = self.table.verticalHeader()
        rows.setVisible(False)
        rows.setSectionResizeMode(qt.QHeaderView.Fixed)
        rows.setDefaultSectionSize(font_metrics(self.table).height() + 8)  # compact rows: more findings in view
        self.table.setWordWrap(False)
        self.table.setMinimumHeight(160)
        self.text_edit.setMinimumHeight(6 * font_metrics(self.text_edit).lineSpacing())
        self.progress.setRange(0, 100)
        self.progress.setValue(0)

        self.job: Optional[Job] = None
        # how the calls are sent: Qt's event loop by default; MiniGPTMedSlicerLib.logic.ThreadRunner() for a worker
        # thread with requests (what the panel did before; kept for comparison in bench/panel_pythonqt.py)
        self.runner = runner if runner is not None else QtRunner(self.widget, on_done=self._job_done)
        self.timer = qt.QTimer(self.widget)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self._poll)

        self.test_button.clicked.connect(self.on_test_connection)
        self.analyze_button.clicked.connect(self.on_analyze)
        self.cancel_button.clicked.connect(self.on_cancel)
        self.clear_button.clicked.connect(self.on_clear)
        self.table.cellClicked.connect(self.on_row_clicked)
        self.url_edit.setPlaceholderText(protocol.DEFAULT_URL)
        self.task_combo.clear()  # the tasks come from the protocol's table, not from the .ui
        for label in TASK_LABELS:
            self.task_combo.addItem(label)
        self.task_combo.currentIndexChanged.connect(self._update_task_widgets)
        self._load_settings()
        self._update_task_widgets()
        self.refresh_regions()
        self.refresh_table()

    # -- settings (stored as str: PythonQt and PySide6 read them back differently otherwise) -----

    def _load_settings(self) -> None:
        url = protocol.DEFAULT_URL
        token = ""
        if self.settings is not None:
            url = to_str(self.settings.value(SETTINGS_PREFIX + "backendUrl", url)) or url
            token = to_str(self.settings.value(SETTINGS_PREFIX + "accessToken", ""))
        self.url_edit.setText(url)
        self.token_edit.setText(token)

    def _save_settings(self) -> None:
        if self.settings is not None:
            self.settings.setValue(SETTINGS_PREFIX + "backendUrl", str(prop(self.url_edit, "text")))
            self.settings.setValue(SETTINGS_PREFIX + "accessToken", str(prop(self.token_edit, "text")))

    def _configure(self) -> None:
        self.logic.configure(str(prop(self.url_edit, "text")), str(prop(self.token_edit, "text")))
        self._save_settings()

    # -- widgets ------------------------------------------------------------------------------

    def _update_task_widgets(self, *args) -> None:
        label = str(prop(self.task_combo, "currentText"))
        spec = protocol.task_by_label(label)
        needs_region = spec is not None and spec.needs_region
        self.region_combo.setEnabled(needs_region)
        self.range_edit.setEnabled(label == SWEEP_LABEL)
        hint = protocol.DETECT.hint if label == SWEEP_LABEL else (spec.hint if spec is not None else None)
        self.question_edit.setEnabled(hint is not None)
        self.question_edit.setPlaceholderText(hint or "(not used by this task)")
        if needs_region:
            self.refresh_regions()

    def refresh_regions(self) -> None:
        current = prop(self.region_combo, "currentData")
        self.region_combo.clear()
        for node in self.logic.roi_nodes():
            self.region_combo.addItem(str(node.GetName()), str(node.GetID()))
        if current is not None:
            idx = self.region_combo.findData(current)
            if idx >= 0:
                self.region_combo.setCurrentIndex(idx)

    def refresh_table(self) -> None:
        assert is_gui_thread(), "widgets and MRML are touched only on the main thread"
        rows = self.logic.rows()
        self.table.setRowCount(0)
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            size = "×".join(f"{v:.1f}" for v in row.size_mm)
            values = [
                row.label,
                size,
                row.view,
                f"{row.slice_offset_mm:.1f}",
                "" if row.score is None else f"{row.score:.2f}",
            ]
            for c, v in enumerate(values):
                item = qt.QTableWidgetItem(str(v))
                item.setData(qt.Qt.UserRole, str(row.node_id))
                self.table.setItem(r, c, item)

    def _set_busy(self, busy: bool, message: str = "") -> None:
        self.analyze_button.setEnabled(not busy)
        self.test_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        if busy:
            self.progress.setRange(0, 0)  # busy indicator until progress is known
        else:
            self.progress.setRange(0, 100)
            self.progress.setValue(100 if message and not message.startswith(("Cancel", "Error")) else 0)
        if message:
            self.status_label.setText(message)

    def _error(self, message: str) -> None:
        assert is_gui_thread(), "widgets and MRML are touched only on the main thread"
        self.status_label.setText(f"Error: {message}")
        self.status_label.setStyleSheet("color: #c62828;")
        if self.error_display is not None:
            self.error_display(message)

    def _ok(self, message: str) -> None:
        self.status_label.setStyleSheet("")
        self.status_label.setText(message)

    # -- actions ------------------------------------------------------------------------------

    def on_test_connection(self) -> None:
        if self.job is not None:
            return
        self._configure()
        self.connection_label.setText("Connecting…")
        self.job = self.logic.start_health(runner=self.runner)
        self._set_busy(True, "Testing the connection…")
        self.timer.start()

    def on_analyze(self) -> None:
        if self.job is not None:
            return
        self._configure()
        spec = protocol.task_by_label(str(prop(self.task_combo, "currentText")))
        if spec is not None and spec.needs_region:
            self.refresh_regions()  # an ROI drawn since the task was picked
        try:
            self.job = self.logic.start(
                view=str(prop(self.view_combo, "currentText")),
                task_name=str(prop(self.task_combo, "currentText")),
                question=str(prop(self.question_edit, "text")),
                region_roi_id=prop(self.region_combo, "currentData") if prop(self.region_combo, "count") else None,
                sweep_range=str(prop(self.range_edit, "text")),
                runner=self.runner,
            )
        except AnalysisError as e:
            self._error(str(e))
            return
        except Exception as e:  # capture failed: nothing was sent, nothing changed
            self._error(describe_error(e))
            return
        self._ok("")
        what = "Sweeping" if self.job.kind == "sweep" else "Analyzing"
        self._set_busy(True, f"{what} the {self.job.view} view…")
        self.timer.start()

    def on_cancel(self) -> None:
        if self.job is None:
            return
        self.logic.cancel(self.job)  # the call in flight is aborted; a result that still comes is discarded
        self.timer.stop()
        self.job = None
        self._set_busy(False, "")
        self._ok("Cancelled. Nothing was added to the scene.")

    def on_clear(self) -> None:
        n = self.logic.clear()
        self.text_edit.setPlainText("")
        self.refresh_table()
        self._ok(f"Removed {n} analysis result(s).")

    def on_row_clicked(self, row: int, column: int = 0) -> None:
        item = self.table.item(row, 0)
        if item is None:
            return
        node_id = item.data(qt.Qt.UserRole)
        if node_id:
            self.logic.jump_to(str(node_id))

    def _poll(self) -> None:
        assert is_gui_thread(), "widgets and MRML are touched only on the main thread"
        job = self.job
        if job is None:
            self.timer.stop()
            return
        if not job.on_main_thread:
            job.done.wait(0.005)  # lends the GIL to a worker thread (Slicer's main thread holds it while idle)
        while not job.progress.empty():
            msg = job.progress.get_nowait()
            self.status_label.setText(f"Sweeping: {msg}")
            try:
                done, total = msg.split(" ")[0].split("/")
                self.progress.setRange(0, int(total))
                self.progress.setValue(int(done))
            except ValueError:
                pass
        if not job.done.is_set():
            return
        self.timer.stop()
        self.job = None
        try:
            outcome = self.logic.finish(job, keep_previous=bool(prop(self.keep_check, "checked")))
        except Exception as e:  # markups creation failed: the scene is unchanged (all or nothing)
            self._set_busy(False, "")
            self._error(f"Could not add the results to the scene: {describe_error(e)}")
            return
        self._set_busy(False, "")
        if job.kind == "health":
            self.connection_label.setText(outcome.message if outcome.ok else "Not connected")
        if not outcome.ok:
            self._error(outcome.message)
            return
        self._ok(outcome.message)
        if job.kind != "health":
            self.text_edit.setPlainText(outcome.text)
            self.refresh_table()
            self.progress.setValue(100)

    def _job_done(self) -> None:
        """A job on the event loop finished: apply it now rather than at the next poll tick."""
        qt.QTimer.singleShot(0, self._poll)

    def cleanup(self) -> None:
        self.timer.stop()
        if self.job is not None:
            self.logic.cancel(self.job)
            self.job = None
