"""The module's logic, without Qt or the Slicer app: capture on the main thread, talk to the backend on a worker
thread, apply results on the main thread, all or nothing.

``MiniGPTMedSlicerLogic`` (the Slicer module's Logic class) is :class:`AnalysisLogic` bound to ``slicer.mrmlScene`` and
the app's slice views; the tests and the headless tools build one on a slicer-core scene. The panel (or any other
shell) calls :meth:`AnalysisLogic.start` on the main thread, then polls the returned :class:`Job` from a timer on the
main thread and calls :meth:`AnalysisLogic.finish` when it is done. The worker thread touches only the network and
plain data, never MRML.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

from . import protocol
from .chat import view_key
from .client import BackendClient, BackendError, Calls, Timeouts, run_calls

if TYPE_CHECKING:  # Slicer's MRML classes (the app's or slicer-core's); without stubs, mypy sees them as Any
    import numpy as np
    from slicer import vtkMRMLMarkupsROINode, vtkMRMLScene, vtkMRMLSliceLogic

    from .capture import CapturedSlice
    from .chat import ChatState
    from .dicom_series import Series
    from .export import FolderExport
    from .markups import FindingRow

#: The panel's one task that is not a wire task: detect over the slices of a volume, merged into 3D findings.
SWEEP_LABEL = "Sweep volume"
#: The panel's task names, in the combo's order: the protocol's tasks, then the sweep.
TASK_LABELS: Tuple[str, ...] = (*(t.label for t in protocol.TASK_TABLE), SWEEP_LABEL)


class AnalysisError(Exception):
    """A problem to show to the user (bad input in the panel, no volume in the view, ...)."""


@dataclass
class Job:
    kind: str  # "analyze" | "follow_up" | "sweep" | "health"
    task: str
    view: str
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    progress: queue.Queue[str] = field(default_factory=queue.Queue)
    result: Any = None
    error: Optional[BaseException] = None
    started: float = field(default_factory=time.monotonic)
    context: Dict[str, Any] = field(default_factory=dict)  # main-thread data (captured slices, plan, options)
    on_main_thread: bool = False  # its calls run on the main thread's event loop (no worker thread to lend the GIL)
    abort: Optional[Callable[[], None]] = None  # set by a transport that can abort the call in flight
    streamed: str = ""  # the answer so far, while a transport that reads it as it comes streams it

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass
class Outcome:
    """What :meth:`AnalysisLogic.finish` reports back to the panel."""

    ok: bool
    message: str
    text: str = ""
    n_findings: int = 0


class ThreadRunner:
    """Runs a job's calls (:data:`.client.Calls`) with ``requests`` on a daemon worker thread; the result or the
    error lands in the job and ``job.done`` is set. The default; the panel passes a Qt runner instead
    (MiniGPTMedSlicerQt/qt_transport.py), whose calls run on the main thread's event loop."""

    on_main_thread = False

    def run(self, job: Job, client: BackendClient, calls: Calls) -> None:
        def target() -> None:
            try:
                try:
                    job.result = run_calls(calls, client, job.cancel)
                finally:
                    client.close()
            except BaseException as e:  # reported to the main thread
                job.error = e
            finally:
                job.done.set()

        threading.Thread(target=target, name=f"minigptmed-{job.kind}", daemon=True).start()


class AnalysisLogic:
    """``scene``: the MRML scene; ``slice_logics``: a callable returning {view name: slice logic} (the app's or
    slicer-core's)."""

    def __init__(
        self,
        scene: vtkMRMLScene,
        slice_logics: Callable[[], Dict[str, vtkMRMLSliceLogic]],
        timeouts: Optional[Timeouts] = None,
        instance_file: Optional[Callable[[str], Optional[str]]] = None,
    ) -> None:
        self.scene = scene
        self.slice_logics = slice_logics
        # SOP Instance UID -> its file (Slicer: the DICOM database); None: no DICOM source for the SR export
        self.instance_file = instance_file
        # writes an exported SR into the application's DICOM database (Slicer only: DICOMLib); None: not available
        self.add_to_dicom_database: Optional[Callable[[str], str]] = None
        self.timeouts = timeouts or Timeouts()
        self.base_url = protocol.DEFAULT_URL
        self.token: Optional[str] = None
        self.export_size: Optional[int] = None
        self.batch_size = 8
        # analyses and follow-ups are answered as server-sent events (shown as they come by a streaming transport;
        # Cancel then names the request: DELETE /v1/requests/{id}); False: one JSON answer
        self.stream_answers = True
        # the conversation about the image in a view (see chat.py): started by an analysis or a first question,
        # continued by follow-up questions, ended when its view, slice or volume changes (then this is called with
        # the reason, on the main thread: the panel clears its transcript)
        self.chat: Optional[ChatState] = None
        # the tasks the backend at base_url listed in its last health answer (Test connection, a sweep); None: not
        # known (not asked yet, the connection failed, or another URL since)
        self.engine_tasks: Optional[List[str]] = None
        self.on_conversation_ended: Optional[Callable[[str], None]] = None
        self._chat_generation = 0
        self._watched: List[Tuple[Any, int]] = []
        self._view_moving = 0  # > 0 while a sweep moves the view to capture its slices (it puts it back)

    # -- backend ------------------------------------------------------------------------------

    def configure(self, base_url: str, token: Optional[str]) -> None:
        base_url = (base_url or "").strip() or protocol.DEFAULT_URL
        if base_url != self.base_url:
            self.engine_tasks = None  # another backend: what the last one answered says nothing about it
        self.base_url = base_url
        self.token = (token or "").strip() or None

    def ask_hint(self) -> Optional[str]:
        """Why a question (Ask) cannot be asked of the connected engine (it lists no free questions), or None."""
        from .chat import ask_unavailable

        return ask_unavailable(self.engine_tasks)

    def client(self) -> BackendClient:
        return BackendClient(self.base_url, token=self.token, timeouts=self.timeouts)

    def start_health(self, runner: Optional[Any] = None) -> Job:
        job = Job(kind="health", task="health", view="")
        self._run(job, lambda client: _one(client.health_request()), runner)
        return job

    # -- analyses -----------------------------------------------------------------------------

    def slice_logic(self, view: str) -> vtkMRMLSliceLogic:
        logics = self.slice_logics()
        if view not in logics:
            raise AnalysisError(f"there is no {view} slice view")
        return logics[view]

    def roi_nodes(self) -> List[vtkMRMLMarkupsROINode]:
        col = self.scene.GetNodesByClass("vtkMRMLMarkupsROINode")
        nodes = [col.GetItemAsObject(i) for i in range(col.GetNumberOfItems())]
        return [n for n in nodes if n.GetAttribute("MiniGPTMed.task") is None]  # user-drawn ROIs only

    def start(
        self,
        view: str,
        task_name: str,
        question: str = "",
        region_roi_id: Optional[str] = None,
        sweep_range: str = "",
        runner: Optional[Any] = None,
    ) -> Job:
        """Validate and capture on the main thread, then send with ``runner`` (default: a :class:`ThreadRunner`)."""
        from .capture import to_request
        from .scene import volume_of

        spec = protocol.task_by_label(task_name)
        if spec is None and task_name != SWEEP_LABEL:
            raise AnalysisError(f"unknown task {task_name!r}")
        question = (question or "").strip()
        if spec is not None and protocol.missing_input(spec.id, question, None) == "question":
            raise AnalysisError(f"Type {spec.question} for {spec.label}.")
        sl = self.slice_logic(view)
        volume = volume_of(sl)
        if volume is None:
            raise AnalysisError(f"The {view} view shows no volume: load one and show it in that view.")
        if spec is None:
            return self._start_sweep(view, sl, volume, question, sweep_range, runner)
        task = spec.id
        captured = self._capture(sl)
        region = self._region(spec, captured, view, region_roi_id)
        request = to_request(captured, task, question=question or None, region=region)
        job = Job(
            kind="analyze",
            task=task,
            view=view,
            context={"captured": captured, "request": request, "key": view_key(view, sl)},
        )
        call = (lambda c: c.stream_request(request)) if self.stream_answers else (lambda c: c.analyze_request(request))
        self._run(job, lambda client: _one(call(client)), runner)
        return job

    def start_follow_up(
        self,
        view: str,
        question: str,
        runner: Optional[Any] = None,
        task_name: str = protocol.VQA.label,
        region_roi_id: Optional[str] = None,
    ) -> Job:
        """A question (the panel's question box: Ask; any single-image task here) about the image in ``view``: a
        follow-up of the conversation about it (the image stored once on the server, the earlier turns sent as
        history), or the first turn of a new one when there is none or the view, its slice or its volume changed.
        Sent with ``runner``; :meth:`finish` adds the answer (its boxes under the conversation's analysis)."""
        import dataclasses

        from .capture import to_request
        from .conversation import Conversation
        from .scene import volume_of

        spec = protocol.task_by_label(task_name)
        if spec is None:
            raise AnalysisError(f"unknown task {task_name!r}")
        question = (question or "").strip()
        if protocol.missing_input(spec.id, question, None) == "question":
            raise AnalysisError(f"Type {spec.question} for {spec.label}.")
        sl = self.slice_logic(view)
        if volume_of(sl) is None:
            raise AnalysisError(f"The {view} view shows no volume: load one and show it in that view.")
        key = view_key(view, sl)
        state = self.chat if self.chat is not None and (self.chat.view, self.chat.key) == (view, key) else None
        if state is None and self.chat is not None:
            self.new_conversation()
        captured = state.captured if state is not None else None
        if captured is None:  # a new conversation, or one restored from the scene: the image as it is shown now
            captured = self._capture(sl)
        region = self._region(spec, captured, view, region_roi_id)
        request = to_request(captured, spec.id, question=question or None, region=region)
        if state is None:
            conv = Conversation(image=request.image or "", values=request.values)
        else:  # a copy: the conversation changes only when the answer is in the scene (finish)
            conv = dataclasses.replace(state.conversation, turns=list(state.conversation.turns))
            if state.captured is None:  # restored: its saved image_id only if the view shows that image still
                conv.image, conv.values = request.image or "", request.values
                if conv.digest() != state.image_digest:
                    conv.image_id = None
        job = Job(
            kind="follow_up",
            task=spec.id,
            view=view,
            context={
                "captured": captured,
                "conversation": conv,
                "folder": state.folder_item if state is not None else None,
                "key": key,
                "generation": self._chat_generation,
            },
        )
        self._run(job, lambda client: conv.ask(client, request, stream=self.stream_answers), runner)
        return job

    def _capture(self, sl: vtkMRMLSliceLogic) -> CapturedSlice:
        """The slice in view as it is shown (an analysis's or a conversation's image)."""
        from .capture import capture_slice

        try:
            return capture_slice(sl, export_size=self.export_size)
        except ValueError as e:
            raise AnalysisError(str(e)) from None

    def _region(
        self, spec: protocol.TaskSpec, captured: CapturedSlice, view: str, region_roi_id: Optional[str]
    ) -> Optional[Tuple[float, float, float, float]]:
        """The region of a task that needs one: the ROI ``region_roi_id`` in the captured slice's pixels (None for a
        task without a region)."""
        from .capture import region_from_roi

        if not spec.needs_region:
            return None
        roi = self.scene.GetNodeByID(region_roi_id) if region_roi_id else None
        if roi is None:
            raise AnalysisError(f"{spec.label} needs an ROI: draw one in the view and pick it as Region ROI.")
        try:
            return region_from_roi(captured, roi)
        except ValueError as e:
            raise AnalysisError(f"The ROI {roi.GetName()!r} is not in the {view} view: {e}") from None

    # -- the conversation ------------------------------------------------------------------------

    def transcript(self) -> str:
        """The questions and answers of the conversation going on ("" when there is none)."""
        return self.chat.conversation.transcript() if self.chat is not None else ""

    def new_conversation(self, reason: str = "") -> None:
        """Forget the conversation (its analysis stays in the scene); ``reason``: tell :attr:`on_conversation_ended`."""
        had = self.chat is not None
        self.chat = None
        self._chat_generation += 1
        self._unwatch()
        if had and reason and self.on_conversation_ended is not None:
            self.on_conversation_ended(reason)

    def select_view(self, view: str) -> None:
        """The panel's view changed: a conversation about another view ends."""
        if self.chat is not None and self.chat.view != view:
            self.new_conversation(f"New conversation: the view changed to {view}.")

    def restore_conversation(self) -> Optional[ChatState]:
        """After the scene was loaded (e.g. from a ``.mrb``): the newest conversation saved in it becomes the panel's
        (its transcript is shown; a question continues it if its view still shows the same slice of the same
        volume, with the earlier turns as history). None when the scene holds none."""
        from .chat import saved_conversation

        self.new_conversation()
        state = saved_conversation(self.scene)
        if state is not None:
            self.chat = state
            self._watch(state.view)
        return state

    def _adopt(self, state: ChatState, generation: int) -> None:
        """``state`` becomes the conversation going on, unless New conversation was asked for meanwhile or its view
        no longer shows that image."""
        if generation != self._chat_generation:
            return
        if not self._shows_its_image(state):
            self.new_conversation(f"New conversation: the {state.view} view changed.")
            return
        self._unwatch()
        self.chat = state
        self._watch(state.view)

    def _watch(self, view: str) -> None:
        """Observe the view's slice and composite nodes: a change of slice plane or volume ends the conversation."""
        try:
            sl = self.slice_logic(view)
        except AnalysisError:
            return
        for node in (sl.GetSliceNode(), sl.GetSliceCompositeNode()):
            if node is not None:
                self._watched.append((node, node.AddObserver("ModifiedEvent", self._on_view_modified)))

    def _unwatch(self) -> None:
        for node, tag in self._watched:
            node.RemoveObserver(tag)
        self._watched.clear()

    @contextlib.contextmanager
    def _moving_view(self) -> Iterator[None]:
        """A sweep's capture moves the view to each slice and puts it back: no change of the conversation's image."""
        self._view_moving += 1
        try:
            yield
        finally:
            self._view_moving -= 1

    def _on_view_modified(self, caller: Any = None, event: Any = None) -> None:
        if self._view_moving:
            return
        state = self.chat
        if state is not None and not self._shows_its_image(state):
            self.new_conversation(f"New conversation: the slice or the volume of the {state.view} view changed.")

    def _shows_its_image(self, state: ChatState) -> bool:
        """Whether the conversation's view still shows its image (the same slice plane of the same volume)."""
        try:
            return view_key(state.view, self.slice_logic(state.view)) == state.key
        except AnalysisError:  # the view is gone
            return False

    def _start_sweep(self, view: str, sl, volume, question: str, sweep_range: str, runner: Optional[Any]) -> Job:
        from .sweep import capture_at, capture_sweep, parse_range, plan_sweep, sweep_calls

        task = protocol.DETECT.id  # the question, if any, names the kind of finding (the runner also sweeps ground)
        full = plan_sweep(sl, volume)
        parts = (sweep_range or "").strip().split(":")
        step = 1
        if len(parts) == 3:
            step = int(parts[2]) if parts[2].strip() else 1
            parts = parts[:2]
        try:
            rng = parse_range(":".join(parts) if parts != [""] else None, full.slice_count)
            plan = plan_sweep(sl, volume, rng, step)
        except ValueError as e:
            raise AnalysisError(f"Sweep slices: {e}") from None
        job = Job(kind="sweep", task=task, view=view)
        runner = runner or ThreadRunner()
        captured: list = []
        job.context.update(captured=captured, plan=plan)
        if runner.on_main_thread:  # each slice is captured when its turn comes, between event-loop turns

            def slices():
                for offset in plan.offsets_mm:
                    with self._moving_view():
                        captured.append(capture_at(sl, offset, self.export_size))
                    yield captured[-1]

            source: Any = slices()
        else:  # MRML is read on the main thread only: all of it now, before the worker starts
            with self._moving_view():
                captured.extend(capture_sweep(sl, plan, export_size=self.export_size, cancel=job.cancel))
            source = captured

        def calls(client: BackendClient) -> Calls:
            job.context["health"] = yield client.health_request()
            return (
                yield from sweep_calls(
                    client,
                    source,
                    len(plan.offsets_mm),
                    task,
                    question or None,
                    self.batch_size,
                    cancel=job.cancel,
                    progress=lambda p: job.progress.put(str(p)),
                )
            )

        self._run(job, calls, runner)
        return job

    def _run(self, job: Job, calls: Callable[[BackendClient], Calls], runner: Optional[Any] = None) -> None:
        """Send ``calls`` (made with a fresh client) with ``runner``; the result or the error lands in ``job``."""
        runner = runner or ThreadRunner()
        job.on_main_thread = bool(runner.on_main_thread)
        try:
            client = self.client()
        except BaseException as e:  # a bad URL: reported like any other failure
            job.error = e
            job.done.set()
            return
        runner.run(job, client, calls(client))

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: its result, if it still comes, is discarded; a transport that can abort the call does."""
        job.cancel.set()
        if job.abort is not None:
            job.abort()

    def finish(self, job: Job, keep_previous: bool = True) -> Outcome:
        """On the main thread, once ``job.done`` is set: create the markups (all or nothing) or explain the error."""
        from . import markups as M

        if job.cancelled:
            return Outcome(False, "Cancelled. Nothing was added to the scene.")
        if job.error is not None:
            if job.kind == "health":
                self.engine_tasks = None
            return Outcome(False, describe_error(job.error))
        if job.kind in ("analyze", "follow_up"):
            return self._finish_turn(job, keep_previous)
        if job.kind == "sweep":
            from .sweep import merge_sweep, summarize

            plan, captured = job.context["plan"], job.context["captured"]
            findings = merge_sweep(captured, job.result, plan)
            health = job.context["health"]
            self.engine_tasks = list(health.tasks)
            summary = summarize(findings, plan, job.view, health.engine, health.model)
            M.add_sweep_results(
                self.scene,
                findings,
                task=job.task,
                engine=health.engine,
                model=health.model,
                view_name=job.view,
                summary=summary,
                offsets_mm=plan.offsets_mm,
                replace_previous=not keep_previous,
            )
            return Outcome(
                True,
                f"{len(findings)} finding(s) over {len(plan.indices)} slices in {job.elapsed():.1f} s.",
                summary,
                len(findings),
            )
        health = job.result
        self.engine_tasks = list(health.tasks)
        return Outcome(
            True,
            f"Connected: {health.engine} engine, {health.model} on {health.device}; tasks: {', '.join(health.tasks)}.",
        )

    def _finish_turn(self, job: Job, keep_previous: bool) -> Outcome:
        """An analysis (the first turn of a new conversation) or a follow-up: its boxes become markups (under the
        conversation's analysis for a follow-up), the conversation is saved on the analysis' text node."""
        from . import markups as M
        from .chat import ChatState, text_attributes
        from .conversation import Conversation

        response: protocol.AnalyzeResponse = job.result
        ctx = job.context
        captured = ctx["captured"]
        if job.kind == "analyze":
            request = ctx["request"]
            conv = Conversation(image=request.image or "", values=request.values)
            conv.add(request, response)
            folder, generation = None, self._chat_generation + 1
        else:
            conv, folder, generation = ctx["conversation"], ctx["folder"], ctx["generation"]
        state = ChatState(job.view, ctx["key"], conv, captured, folder)
        if folder is not None and folder in M.list_results(self.scene):
            M.add_turn_results(
                self.scene,
                folder,
                captured,
                response,
                turn=len(conv.turns),
                text=conv.transcript(),
                text_attributes=text_attributes(state),
            )
        else:  # a new conversation (or its analysis was removed meanwhile): a new analysis
            out = M.add_analysis_results(
                self.scene,
                captured,
                response,
                replace_previous=not keep_previous,
                text_attributes=text_attributes(state),
            )
            state.folder_item = out.folder_item
        if job.kind == "analyze":
            self.new_conversation()
        self._adopt(state, generation)
        note = f" ({'; '.join(response.warnings)})" if response.warnings else ""
        turn = f" (turn {len(conv.turns)})" if len(conv.turns) > 1 else ""
        return Outcome(
            True,
            f"{len(response.findings)} finding(s) from {response.engine} in {job.elapsed():.1f} s{turn}{note}.",
            response.text,
            len(response.findings),
        )

    def analyze(
        self,
        view: str = "Red",
        task_name: str = protocol.DETECT.label,
        question: str = "",
        region_roi_id: Optional[str] = None,
        sweep_range: str = "",
        keep_previous: bool = True,
        timeout_s: float = 300.0,
    ) -> Outcome:
        """Run one analysis and wait for it (scripts, the Python console, the module's self-test), calling
        :meth:`process_events` meanwhile. Past ``timeout_s`` the analysis is cancelled and nothing is added."""
        job = self.start(view, task_name, question, region_roi_id, sweep_range)
        while not job.done.wait(0.02):
            self.process_events()
            if job.elapsed() > timeout_s:
                job.cancel.set()
                break
        outcome = self.finish(job, keep_previous=keep_previous)
        logging.info(f"MiniGPT-Med {task_name} on {view}: {outcome.message} ({job.elapsed():.2f} s)")
        return outcome

    def process_events(self) -> None:
        """Called while :meth:`analyze` waits; the Slicer Logic keeps the application responsive here."""

    # -- results ------------------------------------------------------------------------------

    def rows(self) -> List[FindingRow]:
        from .markups import finding_rows

        return finding_rows(self.scene)

    def jump_to(self, node_id: str) -> Optional[np.ndarray]:
        from .markups import jump_to_finding

        roi = self.scene.GetNodeByID(node_id)
        if roi is None:
            return None
        nodes = [sl.GetSliceNode() for sl in self.slice_logics().values()]
        return jump_to_finding(nodes, roi)

    def clear(self) -> int:
        from .markups import clear_results

        self.new_conversation()
        return clear_results(self.scene)

    # review (the panel's Accept / Reject / Edit; statuses are node attributes, see review.py)
    def set_review(self, node_ids: List[str], status: str) -> None:
        from . import review

        review.set_all([n for n in (self.scene.GetNodeByID(i) for i in node_ids) if n is not None], status)

    def review_all(self, status: str) -> None:
        from . import review

        review.set_all(review.finding_rois(self.scene), status)

    def begin_edit(self, node_id: str) -> None:
        from . import review

        review.begin_edit(self.scene.GetNodeByID(node_id))

    def finish_edit(self, node_id: str) -> str:
        from . import review

        return review.finish_edit(self.scene.GetNodeByID(node_id))

    # export (the panel's Export section; the same functions the runner uses, see export.py)
    def source_series(self) -> Optional[Series]:
        """The DICOM series shown in a slice view (its volume's ``DICOM.instanceUIDs``, resolved to files by
        :attr:`instance_file`), or None: the SR needs it."""
        from . import dicom_series
        from .scene import volume_of

        if self.instance_file is None:
            return None
        for sl in self.slice_logics().values():
            vol = volume_of(sl)
            uids = (vol.GetAttribute("DICOM.instanceUIDs") or "").split() if vol is not None else []
            files = [self.instance_file(u) for u in uids]
            if uids and all(files):
                found = dicom_series.scan_files([f for f in files if f])
                if found:
                    return found[0]
        return None

    def export(self, folder: str, sr: bool = True, table: bool = True, markups: bool = True) -> FolderExport:
        from .export import export_folder

        folder = (folder or "").strip()
        if not folder:
            raise AnalysisError("Choose a folder to export into.")
        return export_folder(self.scene, folder, self.source_series() if sr else None, sr, table, markups)


def _one(request: Any) -> Calls:
    """A single call as a sequence of calls."""
    return (yield request)


def describe_error(e: BaseException) -> str:
    if isinstance(e, BackendError):
        return e.message
    if isinstance(e, AnalysisError):
        return str(e)
    from .sweep import SweepCancelled

    if isinstance(e, SweepCancelled):
        return "Cancelled. Nothing was added to the scene."
    return f"Unexpected error: {type(e).__name__}: {e}"
