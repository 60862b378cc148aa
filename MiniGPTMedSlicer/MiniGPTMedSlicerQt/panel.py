"""The MiniGPT-Med panel: the .ui form wired to the module's logic (:class:`MiniGPTMedSlicerLib.logic.AnalysisLogic`).

Runs in Slicer (PythonQt) and under PySide6 offscreen (tests). The HTTP calls run on Qt's asynchronous network
access manager (:mod:`.qt_transport`: no Python thread, so nothing waits for the GIL that Slicer's main thread
keeps); a QTimer on the main thread shows progress, and the results are applied on the main thread (MRML too).
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional

from MiniGPTMedSlicerLib import protocol
from MiniGPTMedSlicerLib.logic import SWEEP_LABEL, TASK_LABELS, AnalysisError, AnalysisLogic, Job, describe_error
from MiniGPTMedSlicerLib.review import ACCEPTED, EDITED, REJECTED

from .qt_compat import find, font_metrics, is_gui_thread, load_ui, prop, qt, to_str
from .qt_transport import QtRunner

UI_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "UI", "MiniGPTMedSlicer.ui"
)
SETTINGS_PREFIX = "MiniGPTMedSlicer/"
POLL_MS = 50
SIZE_COLUMN, STATUS_COLUMN = 1, 5  # of the findings table
#: The review keys on the findings table (Qt key names): what they do.
REVIEW_KEYS = {"A": "accept", "R": "reject", "E": "edit", "N": "next", "P": "previous"}


class ReviewKeys(qt.QObject):
    """An event filter on the findings table: A accept, R reject, E edit, N / P next / previous finding."""

    def __init__(self, panel: Panel):
        super().__init__(panel.widget)
        self.panel = panel
        self.actions = {int(getattr(qt.Qt, "Key_" + key)): action for key, action in REVIEW_KEYS.items()}

    def eventFilter(self, obj, event) -> bool:
        if event.type() != qt.QEvent.KeyPress or event.modifiers() != qt.Qt.NoModifier:
            return False
        action = self.actions.get(int(event.key()))
        if action is None:
            return False
        p = self.panel
        {
            "accept": p.on_accept,
            "reject": p.on_reject,
            "edit": p.on_edit,
            "next": lambda: p.move_selection(1),
            "previous": lambda: p.move_selection(-1),
        }[action]()
        return True


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
        self.accept_button = find(w, "acceptButton")
        self.reject_button = find(w, "rejectButton")
        self.accept_all_button = find(w, "acceptAllButton")
        self.reject_all_button = find(w, "rejectAllButton")
        self.edit_button = find(w, "editButton")
        self.show_rejected_check = find(w, "showRejectedCheckBox")
        self.export_folder_edit = find(w, "exportFolderLineEdit")
        self.export_browse_button = find(w, "exportBrowseButton")
        self.export_sr_check = find(w, "exportSrCheckBox")
        self.export_table_check = find(w, "exportTableCheckBox")
        self.export_markups_check = find(w, "exportMarkupsCheckBox")
        self.add_to_database_check = find(w, "addToDatabaseCheckBox")
        self.export_button = find(w, "exportButton")
        self.conversation_edit = find(w, "conversationTextEdit")
        self.follow_up_edit = find(w, "followUpLineEdit")
        self.new_conversation_button = find(w, "newConversationButton")
        # the question box as the .ui has it (back when the engine answers free questions again)
        self._ask_placeholder = str(prop(self.follow_up_edit, "placeholderText"))
        self._ask_tooltip = str(prop(self.follow_up_edit, "toolTip"))
        self._statuses: List[str] = []  # review status of each table row
        self.editing: Optional[str] = None  # the node id of the finding being edited
        self._edit_observer: Optional[int] = None

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
        self.conversation_edit.setMinimumHeight(6 * font_metrics(self.conversation_edit).lineSpacing())
        self.progress.setRange(0, 100)
        self.progress.setValue(0)

        self.job: Optional[Job] = None
        self._closed = False  # cleanup() ran: the widgets may be deleted, callbacks that still come are dropped
        # how the calls are sent: Qt's event loop by default; MiniGPTMedSlicerLib.logic.ThreadRunner() for a worker
        # thread with requests (what the panel did before; kept for comparison in bench/panel_pythonqt.py)
        self.runner = runner if runner is not None else QtRunner(self.widget, self._job_done, self._show_streamed)
        self._pending_transcript = ""  # the transcript shown while a follow-up is answered (its answer streams in)
        self._text_before = ""  # the findings box before a streamed answer began to fill it (back on cancel, error)
        self.timer = qt.QTimer(self.widget)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self._poll)

        self.test_button.clicked.connect(self.on_test_connection)
        self.analyze_button.clicked.connect(self.on_analyze)
        self.cancel_button.clicked.connect(self.on_cancel)
        self.clear_button.clicked.connect(self.on_clear)
        self.table.cellClicked.connect(self.on_row_clicked)
        self.accept_button.clicked.connect(self.on_accept)
        self.reject_button.clicked.connect(self.on_reject)
        self.accept_all_button.clicked.connect(self.on_accept_all)
        self.reject_all_button.clicked.connect(self.on_reject_all)
        self.edit_button.clicked.connect(self.on_edit)
        self.show_rejected_check.toggled.connect(self._update_hidden_rows)
        self.export_button.clicked.connect(self.on_export)
        self.export_browse_button.clicked.connect(self.on_browse_export_folder)
        self.follow_up_edit.returnPressed.connect(self.on_ask)
        self.new_conversation_button.clicked.connect(self.on_new_conversation)
        self.view_combo.currentIndexChanged.connect(self._on_view_changed)
        self.logic.on_conversation_ended = self._conversation_ended
        self._update_database_option()
        # the review keys on the findings table: a filter sees the key before the table's own keyboard search
        self.key_filter = ReviewKeys(self)
        self.table.installEventFilter(self.key_filter)
        self.url_edit.setPlaceholderText(protocol.DEFAULT_URL)
        self.task_combo.clear()  # the tasks come from the protocol's table, not from the .ui
        for label in TASK_LABELS:
            self.task_combo.addItem(label)
        self.task_combo.currentIndexChanged.connect(self._update_task_widgets)
        self._load_settings()
        self.url_edit.textChanged.connect(self._on_url_changed)
        self._update_task_widgets()
        self._update_ask_widgets()
        self.refresh_regions()
        self.refresh_table()
        self.restore_conversation()

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

    def _update_ask_widgets(self) -> None:
        """The question box (Enter sends Ask) is usable unless the connected engine answers no free questions."""
        hint = self.logic.ask_hint()
        self.follow_up_edit.setEnabled(hint is None)
        self.follow_up_edit.setPlaceholderText(hint or self._ask_placeholder)
        self.follow_up_edit.setToolTip(hint or self._ask_tooltip)

    def _on_url_changed(self, *args) -> None:
        """Another backend URL: what the last engine listed no longer holds (the box is usable until it is asked)."""
        self.logic.configure(str(prop(self.url_edit, "text")), str(prop(self.token_edit, "text")))
        self._update_ask_widgets()

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
        self._statuses = [row.status for row in rows]
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
                "editing" if row.node_id == self.editing else row.status,
            ]
            for c, v in enumerate(values):
                item = qt.QTableWidgetItem(str(v))
                item.setData(qt.Qt.UserRole, str(row.node_id))
                self.table.setItem(r, c, item)
        self._update_hidden_rows()

    def _set_busy(self, busy: bool, message: str = "") -> None:
        self.analyze_button.setEnabled(not busy)
        self.test_button.setEnabled(not busy)
        self.clear_button.setEnabled(not busy)  # it removes the analysis a running follow-up's answer goes under
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
        job = self._start(
            lambda: self.logic.start(
                view=str(prop(self.view_combo, "currentText")),
                task_name=str(prop(self.task_combo, "currentText")),
                question=str(prop(self.question_edit, "text")),
                region_roi_id=prop(self.region_combo, "currentData") if prop(self.region_combo, "count") else None,
                sweep_range=str(prop(self.range_edit, "text")),
                runner=self.runner,
            )
        )
        if job is None:
            return
        what = "Sweeping" if job.kind == "sweep" else "Analyzing"
        self._set_busy(True, f"{what} the {job.view} view…")
        self.timer.start()

    def _start(self, start: Callable[[], Job]) -> Optional[Job]:
        """Start an analysis or a question with ``start`` (the logic's checks and capture, on the main thread): the job
        it sends, kept as the panel's, or None with the error shown (nothing was sent, nothing changed)."""
        try:
            self.job = start()
        except AnalysisError as e:  # bad input in the panel, no volume in the view, ...
            self._error(str(e))
            return None
        except Exception as e:  # capture failed
            self._error(describe_error(e))
            return None
        self._ok("")
        self._text_before = self.text_edit.toPlainText()
        return self.job

    def on_cancel(self) -> None:
        if self.job is None:
            return
        self._abandon_job()
        self.refresh_conversation()
        self._ok("Cancelled. Nothing was added to the scene.")

    def _abandon_job(self) -> None:
        """Cancel the job in flight (Cancel, New conversation during a follow-up): the call is aborted (a streamed
        answer's request named in ``DELETE /v1/requests/{id}`` first); its pieces and its result, if they still
        come, are dropped; the findings box goes back to what it was (a streamed answer's first words go)."""
        assert self.job is not None
        self.logic.cancel(self.job)
        self.timer.stop()
        self.job = None
        self._set_busy(False, "")
        self.text_edit.setPlainText(self._text_before)

    # -- the conversation (the logic keeps it: MiniGPTMedSlicerLib.chat) ---------------------------

    def on_ask(self) -> None:
        """Enter in the question box: a follow-up about the image in the chosen view (or the first question of a
        new conversation when the view, its slice or its volume changed)."""
        if self.job is not None:
            return
        self._configure()
        hint = self.logic.ask_hint()
        if hint is not None:  # the box is disabled then; Enter cannot reach here, a direct call gets the reason
            self._error(hint)
            return
        question = str(prop(self.follow_up_edit, "text"))
        job = self._start(
            lambda: self.logic.start_follow_up(
                view=str(prop(self.view_combo, "currentText")), question=question, runner=self.runner
            )
        )
        if job is None:
            return
        shown = self.logic.transcript()
        self._pending_transcript = (shown + "\n\n" if shown else "") + f"Q: {question.strip()}\nA: "
        self._show_transcript(self._pending_transcript + "…")
        self._set_busy(True, f"Asking about the {job.view} view…")
        self.timer.start()

    def on_new_conversation(self) -> None:
        """Forget the earlier turns; a follow-up on its way belongs to them: it is cancelled, as Cancel does."""
        cancelled = self.job is not None and self.job.kind == "follow_up"
        if cancelled:
            self._abandon_job()
        self.logic.new_conversation()
        self.refresh_conversation()
        note = " (the question on its way was cancelled)" if cancelled else ""
        self._ok(f"New conversation{note}: the next question starts from the image in view.")

    def _on_view_changed(self, *args) -> None:
        self.logic.select_view(str(prop(self.view_combo, "currentText")))

    def _conversation_ended(self, reason: str) -> None:
        """The logic ended the conversation (its view, slice or volume changed)."""
        if self.job is not None and self.job.kind == "follow_up":
            return  # the answer on its way belongs to the old image; the transcript is redrawn when it lands
        self.refresh_conversation()
        self._ok(reason)

    def refresh_conversation(self) -> None:
        self._show_transcript(self.logic.transcript())

    def _show_transcript(self, text: str) -> None:
        assert is_gui_thread(), "widgets and MRML are touched only on the main thread"
        self.conversation_edit.setPlainText(text)
        bar = self.conversation_edit.verticalScrollBar()
        bar.setValue(int(prop(bar, "maximum")))

    def restore_conversation(self) -> None:
        """The scene was loaded (the module calls this on the scene's EndImportEvent): show the conversation saved
        with its newest analysis."""
        self.logic.restore_conversation()
        self.refresh_conversation()

    def on_clear(self) -> None:
        if self.job is not None:  # the button is disabled then (its answer would go under an analysis removed here)
            return
        self._stop_editing()
        n = self.logic.clear()
        self.text_edit.setPlainText("")
        self.refresh_conversation()
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
        if self._closed:
            return
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
        self._update_ask_widgets()  # a health answer (Test connection, a sweep) lists the engine's tasks
        if job.kind == "health":
            self.connection_label.setText(outcome.message if outcome.ok else "Not connected")
        if job.kind in ("analyze", "follow_up"):
            self.refresh_conversation()
            if not outcome.ok:
                self.text_edit.setPlainText(self._text_before)
        if not outcome.ok:
            self._error(outcome.message)  # a follow-up's question stays in its box, to send again
            return
        self._ok(outcome.message)
        if job.kind == "follow_up":
            self.follow_up_edit.setText("")
        if job.kind != "health":
            self.text_edit.setPlainText(outcome.text)
            self.refresh_table()
            self.progress.setValue(100)

    def _show_streamed(self, job: Job) -> None:
        """The answer so far, as the backend writes it (a streamed analysis or follow-up)."""
        if job is not self.job or self._closed:
            return
        self.text_edit.setPlainText(job.streamed)
        if job.kind == "follow_up":
            self._show_transcript(self._pending_transcript + job.streamed + " …")

    def _job_done(self) -> None:
        """A job on the event loop finished: apply it now rather than at the next poll tick."""
        if not self._closed:
            qt.QTimer.singleShot(0, self._poll)

    # -- review ---------------------------------------------------------------------------------

    def row_node_id(self, row: int) -> Optional[str]:
        item = self.table.item(row, 0)
        node_id = item.data(qt.Qt.UserRole) if item is not None else None
        return str(node_id) if node_id else None

    def selected_rows(self) -> List[int]:
        rows = sorted({item.row() for item in self.table.selectedItems()})
        return [r for r in rows if not self.table.isRowHidden(r)]

    def _update_hidden_rows(self, *args) -> None:
        """Rejected findings are hidden (their ROIs too) until Clear, unless Show rejected is ticked."""
        show = bool(prop(self.show_rejected_check, "checked"))
        for r in range(int(prop(self.table, "rowCount"))):
            rejected = r < len(self._statuses) and self._statuses[r] == REJECTED
            self.table.setRowHidden(r, rejected and not show)

    def _review_selected(self, status: str) -> None:
        rows = self.selected_rows()
        ids = [i for i in (self.row_node_id(r) for r in rows) if i]
        if not ids:
            self._ok("Select findings in the table first.")
            return
        if self.editing in ids:
            self._stop_editing()
        self.logic.set_review(ids, status)
        self.refresh_table()
        self._ok(f"{len(ids)} finding(s) {status}.")
        self._select_row(self._next_visible(rows[-1], 1))

    def on_accept(self) -> None:
        self._review_selected(ACCEPTED)

    def on_reject(self) -> None:
        self._review_selected(REJECTED)

    def on_accept_all(self) -> None:
        self._review_all(ACCEPTED)

    def on_reject_all(self) -> None:
        self._review_all(REJECTED)

    def _review_all(self, status: str) -> None:
        self._stop_editing()
        self.logic.review_all(status)
        self.refresh_table()
        self._ok(f"All {len(self.logic.rows())} finding(s) {status}.")

    def _next_visible(self, row: int, step: int, include_self: bool = False) -> int:
        """The nearest visible row from ``row`` in direction ``step`` (``row`` itself if ``include_self``); -1: none."""
        n = int(prop(self.table, "rowCount"))
        r = row if include_self else row + step
        while 0 <= r < n:
            if not self.table.isRowHidden(r):
                return r
            r += step
        return -1

    def _select_row(self, row: int) -> None:
        if row < 0:
            return
        self.table.clearSelection()
        self.table.selectRow(row)
        self.table.setCurrentCell(row, 0)
        node_id = self.row_node_id(row)
        if node_id:
            self.logic.jump_to(node_id)

    def move_selection(self, step: int) -> None:
        """Next (+1) / previous (-1) finding in the list; the views follow it."""
        rows = self.selected_rows()
        start = rows[-1] if rows and step > 0 else rows[0] if rows else -1 if step > 0 else 0
        nxt = self._next_visible(start, step)
        if nxt < 0 and not rows:
            nxt = self._next_visible(-1, 1)
        self._select_row(nxt)

    def on_edit(self, *args) -> None:
        """Edit toggles: unlock the selected finding's ROI (handles in the view), then lock it and store the edit."""
        if self.editing is not None:
            self._stop_editing()
            return
        rows = self.selected_rows()
        node_id = self.row_node_id(rows[0]) if rows else None
        if node_id is None:
            self.edit_button.setChecked(False)
            self._ok("Select a finding to edit.")
            return
        self.logic.begin_edit(node_id)
        self.editing = node_id
        self.edit_button.setChecked(True)
        self.edit_button.setText("Finish edit")
        roi = self.logic.scene.GetNodeByID(node_id)
        # the row follows the box while it is dragged (the observer runs on the main thread)
        self._edit_observer = roi.AddObserver("ModifiedEvent", lambda caller, event: self._refresh_row(node_id))
        self.refresh_table()
        self._select_row(self._row_of(node_id))
        self._ok("Move or resize the box in the view, then click Finish edit.")

    def _stop_editing(self) -> None:
        node_id, self.editing = self.editing, None
        self.edit_button.setChecked(False)
        self.edit_button.setText("Edit")
        if node_id is None:
            return
        roi = self.logic.scene.GetNodeByID(node_id)
        if roi is not None and self._edit_observer is not None:
            roi.RemoveObserver(self._edit_observer)
        self._edit_observer = None
        if roi is None:
            return
        status = self.logic.finish_edit(node_id)
        self.refresh_table()
        self._ok(f"Finding {status}." if status == EDITED else "Edit finished: the box did not change.")

    def _row_of(self, node_id: str) -> int:
        for r in range(int(prop(self.table, "rowCount"))):
            if self.row_node_id(r) == node_id:
                return r
        return -1

    def _refresh_row(self, node_id: str) -> None:
        """The size cell of the finding being edited, from its ROI as it is now."""
        r = self._row_of(node_id)
        roi = self.logic.scene.GetNodeByID(node_id)
        if r < 0 or roi is None:
            return
        item = self.table.item(r, SIZE_COLUMN)
        if item is not None:
            item.setText("×".join(f"{v:.1f}" for v in roi.GetSize()))

    # -- export ---------------------------------------------------------------------------------

    def _update_database_option(self) -> None:
        available = self.logic.add_to_dicom_database is not None
        self.add_to_database_check.setEnabled(available)
        if not available:
            self.add_to_database_check.setChecked(False)
            self.add_to_database_check.setToolTip("Only inside the Slicer application (DICOMLib)")

    def on_browse_export_folder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(
            self.widget, "Export into", str(prop(self.export_folder_edit, "text"))
        )
        if folder:
            self.export_folder_edit.setText(str(folder))

    def on_export(self) -> None:
        if self.editing is not None:
            self._stop_editing()
        folder = str(prop(self.export_folder_edit, "text")).strip()
        try:
            result = self.logic.export(
                folder,
                sr=bool(prop(self.export_sr_check, "checked")),
                table=bool(prop(self.export_table_check, "checked")),
                markups=bool(prop(self.export_markups_check, "checked")),
            )
        except AnalysisError as e:
            self._error(str(e))
            return
        except Exception as e:  # an unexpected failure: files are written whole or not at all
            self._error(f"Export failed: {describe_error(e)}")
            return
        problems = list(result.problems)
        message = f"Wrote {len(result.written)} file(s) to {folder}"
        sr_files = [f for f in result.written if f.endswith(".dcm")]
        add = self.logic.add_to_dicom_database
        if sr_files and add is not None and bool(prop(self.add_to_database_check, "checked")):
            try:
                message += f"; {add(sr_files[0])}"
            except Exception as e:
                problems.append(f"DICOM database: {describe_error(e)}")
        if problems:
            self._error(f"{message}; " + "; ".join(problems))
        else:
            self._ok(message + ".")

    def cleanup(self) -> None:
        """The module's cleanup (Slicer then destroys the widget: Reload, closing the application). Once: a job in
        flight is cancelled, and what would still come from it (the transport's callbacks, a late poll) is dropped,
        since the Qt objects it would touch may be deleted by then."""
        if self._closed:
            return
        if self.editing is not None:  # lock the ROI again (the widgets may be gone already otherwise)
            self._stop_editing()
        self.timer.stop()
        if self.job is not None:
            self.logic.cancel(self.job)
            self.job = None
        self._closed = True
        close = getattr(self.runner, "close", None)  # the Qt runner's; a ThreadRunner's worker touches no Qt object
        if close is not None:
            close()
        self.logic.on_conversation_ended = None
        self.logic.new_conversation()  # its observers on the slice nodes go (it stays saved with its analysis)
