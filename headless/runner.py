"""``minigptmed-slicer``: the main job without the Slicer app, on Slicer's own MRML (PyPI ``slicer-core``).

    minigptmed-slicer analyze VOLUME --view axial [--slice K | --offset MM] --task detect [--question Q] --out DIR
    minigptmed-slicer sweep   VOLUME --view axial [--range A:B] [--step N] --task detect [--question Q] --out DIR
    minigptmed-slicer batch   FOLDER_OR_CSV --view axial --task report [--sweep] [--jobs N] --out DIR

Without ``--backend`` the built-in engine runs in this process behind a real loopback server, so the path is always
the same HTTP path as with a remote backend. Progress goes to stderr; errors are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from MiniGPTMedSlicerLib.protocol import DETECT, GROUND, TASKS

ORIENTATIONS = {"axial": "Axial", "sagittal": "Sagittal", "coronal": "Coronal"}
VIEW_NAMES = {"axial": "Red", "sagittal": "Yellow", "coronal": "Green"}


class RunnerError(Exception):
    pass


MAX_VIEW_SIZE = 4096  # pixels; the backend's default limits (8192 px a side, 32 MB a body) hold a PNG of this size


def validate(args: argparse.Namespace) -> None:
    """Check the options before anything slow runs; the reason in the options' own words."""
    for name in ("view_size", "export_size"):
        v = getattr(args, name, None)
        if v is not None and not 16 <= v <= MAX_VIEW_SIZE:
            raise RunnerError(f"--{name.replace('_', '-')} {v}: use 16..{MAX_VIEW_SIZE} pixels")
    window = getattr(args, "window", None)
    if window is not None and not window > 0:
        raise RunnerError(f"--window {window:g}: the window width must be > 0 (e.g. 400 for soft tissue)")
    if getattr(args, "batch_size", 1) < 1:
        raise RunnerError(f"--batch-size {args.batch_size}: use 1 or more slices per request")
    if getattr(args, "step", 1) < 1:
        raise RunnerError(f"--step {args.step}: use 1 (every slice) or more")
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not timeout > 0:
        raise RunnerError(f"--timeout {timeout:g}: use a positive number of seconds")


def prepare_out(path: str) -> None:
    """The output folder, created if needed; one-line errors for a file in the way or a folder that cannot be made."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunnerError(f"--out {path}: a file is in the way; give a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise RunnerError(f"--out {path}: cannot create this folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise RunnerError(f"--out {path}: this folder is not writable")


def _progress(msg: str) -> None:
    print(f"[minigptmed-slicer] {msg}", file=sys.stderr, flush=True)


Log = Callable[[str], None]


def _parse_region(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        raise RunnerError(f"--region must be x0,y0,x1,y1 in pixels, got {text!r}") from None
    if len(parts) != 4:
        raise RunnerError(f"--region must be x0,y0,x1,y1 in pixels, got {text!r}")
    return parts


# CT window presets: (width, level) in HU
WINDOW_PRESETS = {
    "soft-tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; each option's default shown (when it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def view_options(sp: argparse.ArgumentParser) -> None:
    """What is sent and how: the options that analyze, sweep and batch share."""
    sp.add_argument("--view", choices=sorted(ORIENTATIONS), default="axial", help="slice view")
    sp.add_argument("--question", default=None, help="the question (vqa), the phrase (ground) or the kind (detect)")
    sp.add_argument("--backend", default=None, help="backend URL; default: the built-in engine in this process")
    sp.add_argument("--token", default=os.environ.get("MINIGPTMED_TOKEN"), help="backend access token")
    sp.add_argument("--view-size", type=int, default=512, help="pixels of the (square) slice view (16..4096)")
    sp.add_argument("--export-size", type=int, default=None, help="resample the sent image: longer side in pixels")
    sp.add_argument("--window", type=float, default=None, help="window width (default: CT 400, else the volume's)")
    sp.add_argument("--level", type=float, default=None, help="window level (default: CT 40, else the volume's)")
    sp.add_argument(
        "--window-preset",
        choices=sorted(WINDOW_PRESETS),
        default=None,
        help="CT window: "
        + ", ".join(f"{k} {w:g}/{lv:g}" for k, (w, lv) in WINDOW_PRESETS.items())
        + " (width/level HU; --window/--level, when given, win)",
    )
    sp.add_argument(
        "--modality",
        default=None,
        help="the modality sent to the model (e.g. CT, MR), for volumes that do not say (default: DICOM's "
        "Modality, CT for a Hounsfield range, else unknown)",
    )
    sp.add_argument(
        "--scene",
        choices=["full", "none"],
        default="full",
        help="full: also write scene.mrb (embeds a copy of the volume); none: only findings.json, input.png, view.png",
    )
    sp.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the backend")


def sweep_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--range", default=None, help="slices A:B (B exclusive; default all)")
    sp.add_argument("--step", type=int, default=1, help="every n-th slice")
    sp.add_argument("--batch-size", type=int, default=8, help="slices per request")
    sp.add_argument("--min-overlap", type=float, default=0.3, help="merge: intersection / smaller box area")
    sp.add_argument("--max-gap", type=int, default=0, help="merge: swept slices a finding may be missed on")


def build_parser() -> argparse.ArgumentParser:
    from backend import __version__

    p = argparse.ArgumentParser(
        prog="minigptmed-slicer", description=(__doc__ or "").replace("``", ""), formatter_class=HelpFormatter
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("volume", nargs="?", help="NIfTI / NRRD file, a DICOM file or a DICOM folder")
        sp.add_argument("--dicomweb", default=None, metavar="URL", help="read the series from this DICOMweb server")
        sp.add_argument("--study", default=None, help="with --dicomweb: the Study Instance UID")
        sp.add_argument("--store-sr", action="store_true", help="with --dicomweb: send the SR back (STOW-RS)")
        sp.add_argument("--series", default=None, help="DICOM folder: a series UID or its number in 'series FOLDER'")
        view_options(sp)
        sp.add_argument("--out", required=True, help="output folder")
        sp.add_argument("--review", default=None, help="review file (JSON); without one every finding is accepted")
        sp.add_argument("--export-sr", default=None, metavar="FILE.dcm", help="DICOM SR (TID 1500) of the findings")
        sp.add_argument("--export-table", default=None, metavar="FILE.csv", help="findings table (+ .json beside)")
        sp.add_argument("--export-markups", default=None, metavar="DIR", help="one Slicer .mrk.json per finding")

    ls = sub.add_parser(
        "series", help="list the DICOM series of a folder (searched recursively)", formatter_class=HelpFormatter
    )
    ls.add_argument("folder")

    a = sub.add_parser("analyze", help="analyze one slice", formatter_class=HelpFormatter)
    common(a)
    a.add_argument("--task", choices=TASKS, default=DETECT.id, help="what to ask")
    g = a.add_mutually_exclusive_group()
    g.add_argument(
        "--slice", type=int, default=None, help="slice number along the view normal (0 = lowest; default: the middle)"
    )
    g.add_argument("--offset", type=float, default=None, help="slice offset in mm (as Slicer's slice slider)")
    a.add_argument("--region", default=None, help="x0,y0,x1,y1 in pixels of the sent image (task identify)")
    a.add_argument("--stream", action="store_true", help="print the answer's text on stdout as the model writes it")
    a.add_argument(
        "--follow-up",
        action="append",
        default=[],
        metavar="QUESTION",
        help="ask this (vqa) about the same image afterwards, with the earlier turns (repeatable)",
    )

    s = sub.add_parser(
        "sweep", help="sweep detect/ground over slices and merge into 3D findings", formatter_class=HelpFormatter
    )
    common(s)
    s.add_argument("--task", choices=[DETECT.id, GROUND.id], default=DETECT.id, help="what to ask on each slice")
    sweep_options(s)

    from .cohort import add_parser

    add_parser(sub)
    return p


@contextlib.contextmanager
def _backend(url: str | None):
    if url:
        yield url
        return
    from backend.engines.builtin import BuiltinEngine
    from backend.server_thread import ServerThread

    _progress("starting the built-in engine on a loopback port")
    with ServerThread(BuiltinEngine()) as local_url:
        yield local_url


def _setup(args, log: Log = _progress):
    from MiniGPTMedSlicerLib import scene as S

    if args.dicomweb:
        import tempfile

        from .pacs import fetch_series

        if not args.study:
            raise RunnerError("--dicomweb needs --study UID")
        args.volume = args._download = tempfile.mkdtemp(prefix="minigptmed-wado-")
        args.series, note = fetch_series(args.dicomweb, args.study, args.series, args.volume)
        log(note)
    elif not args.volume:
        raise RunnerError("give a VOLUME, or --dicomweb URL --study UID")
    elif args.store_sr:
        raise RunnerError("--store-sr needs --dicomweb (the PACS the series came from)")
    ctx = S.create_scene()
    log(f"loading {args.volume}")
    try:
        vol = S.load_volume(ctx, args.volume, series=args.series)
    except S.VolumeLoadError as e:
        S.close(ctx)
        raise RunnerError(str(e)) from None
    if ctx.series_note:
        log(ctx.series_note)
    if args.modality:
        vol.SetAttribute("DICOM.Modality", args.modality.strip().upper())
    display = vol.GetDisplayNode()
    preset = WINDOW_PRESETS.get(args.window_preset or "")
    if args.window is not None or args.level is not None or preset:
        display.AutoWindowLevelOff()
        display.SetWindowLevel(
            args.window if args.window is not None else preset[0] if preset else display.GetWindow(),
            args.level if args.level is not None else preset[1] if preset else display.GetLevel(),
        )
    view = VIEW_NAMES[args.view]
    sl = S.add_slice_view(ctx, vol, view, ORIENTATIONS[args.view], (args.view_size, args.view_size))
    dims = vol.GetImageData().GetDimensions()
    log(
        f"volume {dims[0]}x{dims[1]}x{dims[2]}, modality {vol.GetAttribute('DICOM.Modality') or 'unknown'}, "
        f"window {display.GetWindow():g} / level {display.GetLevel():g}"
    )
    return ctx, vol, sl


def _client(url: str, args):
    from MiniGPTMedSlicerLib.client import BackendClient, Timeouts

    return BackendClient(url, token=args.token, timeouts=Timeouts(analyze_s=args.timeout))


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()


def _review_and_export(args: argparse.Namespace, ctx, log: Log = _progress) -> int:
    """Apply the review file (or accept all), then write the requested exports. Returns the exit code."""
    from MiniGPTMedSlicerLib import export as E
    from MiniGPTMedSlicerLib import review as R

    if args.review:
        statuses = R.apply_review(ctx.scene, R.load_review_file(args.review))
        log("review: " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    else:
        R.set_all(R.finding_rois(ctx.scene), R.ACCEPTED)
    findings = E.collect(ctx.scene)
    if args.export_table:
        log("wrote " + ", ".join(E.write_table(findings, args.export_table)))
    if args.export_markups:
        log(f"wrote {len(E.write_markups(ctx.scene, findings, args.export_markups))} markups file(s)")
    sr_path = args.export_sr or (os.path.join(args.out, "sr.dcm") if args.store_sr else None)
    if sr_path:
        try:
            log(f"wrote {E.write_sr(findings, ctx.dicom_series, sr_path)}")
        except E.ExportError as e:
            print(f"minigptmed-slicer: error: {e}", file=sys.stderr, flush=True)
            return 2
    if args.store_sr:
        import pydicom

        from .pacs import store

        store(args.dicomweb, pydicom.dcmread(str(sr_path)))
        log(f"stored the SR in {args.dicomweb} (STOW-RS)")
    return 0


@dataclass
class Job:
    """A case captured on the main thread (MRML is not thread-safe), ready to send: its scene stays open until
    :func:`finish` has written the outputs. ``requests`` are what :func:`send` posts (network only, any thread)."""

    args: argparse.Namespace
    ctx: Any
    vol: Any
    sl: Any
    captured: Any  # CapturedSlice (analyze) or the list of them (sweep)
    plan: Any = None  # SweepPlan (sweep)
    request: Any = None  # AnalyzeRequest (analyze)

    @property
    def is_sweep(self) -> bool:
        return self.plan is not None


@dataclass
class Answer:
    responses: list
    elapsed_s: float
    conversation: Any = None  # analyze: the Conversation (its turns go into findings.json)
    printed: bool = False  # the answers are already on stdout (--stream, --follow-up)


def _ask(client, request, args: argparse.Namespace, cancel: threading.Event | None) -> Answer:
    """The first question, then each --follow-up about the same image (uploaded once, with the earlier turns), the
    answers' text on stdout as they come with --stream."""
    from MiniGPTMedSlicerLib.client import run_calls
    from MiniGPTMedSlicerLib.conversation import Conversation
    from MiniGPTMedSlicerLib.protocol import VQA, AnalyzeRequest

    t0 = time.perf_counter()
    stream, follow = bool(getattr(args, "stream", False)), list(getattr(args, "follow_up", None) or [])
    conv = Conversation(image=request.image, values=request.values)
    asks = [request] + [AnalyzeRequest(task=VQA.id, question=q) for q in follow]
    first = None
    for i, req in enumerate(asks):
        if i == 0 and not follow and not stream:
            response = client.analyze(req, cancel)
            conv.add(req, response)
        elif stream:
            for piece in conv.stream(client, req):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            response = conv.last_response
        else:
            response = run_calls(conv.ask(client, req), client, cancel)
            print(response.text if i == 0 else f"Q: {req.question}\nA: {response.text}", flush=True)
        first = first or response
    return Answer([first], time.perf_counter() - t0, conv, printed=stream or bool(follow))


def prepare_analyze(args: argparse.Namespace, log: Log = _progress) -> Job:
    """Load the volume, place the slice and capture it; writes ``input.png`` into ``args.out``."""
    from MiniGPTMedSlicerLib import capture as C
    from MiniGPTMedSlicerLib import scene as S
    from MiniGPTMedSlicerLib.sweep import plan_sweep

    prepare_out(args.out)
    ctx, vol, sl = _setup(args, log)
    try:
        plan = plan_sweep(sl, vol)
        if args.slice is not None:
            if not 0 <= args.slice < plan.slice_count:
                raise RunnerError(
                    f"--slice {args.slice} is out of range: this {args.view} view has slices 0..{plan.slice_count - 1}"
                )
            sl.SetSliceOffset(plan.offsets_mm[args.slice])
        elif getattr(args, "offset", None) is not None:
            b = [0.0] * 6
            sl.GetVolumeSliceBounds(vol, b)
            if not b[4] <= args.offset <= b[5]:
                raise RunnerError(f"--offset {args.offset} mm is outside the volume ({b[4]:.1f}..{b[5]:.1f} mm)")
            sl.SetSliceOffset(args.offset)
        else:
            sl.SetSliceOffset(plan.offsets_mm[plan.slice_count // 2])
        captured = C.capture_slice(sl, export_size=args.export_size)
        log(
            f"captured the {args.view} slice at {captured.slice_offset_mm:.2f} mm: {captured.width}x{captured.height} px, "
            f"{captured.pixel_spacing_mm[0]:.3f} mm/px"
        )
        request = C.to_request(
            captured, args.task, question=args.question, region=_parse_region(getattr(args, "region", None))
        )
        with open(os.path.join(args.out, "input.png"), "wb") as f:
            f.write(captured.png)
    except BaseException:
        S.close(ctx)
        raise
    return Job(args, ctx, vol, sl, captured, request=request)


def prepare_sweep(args: argparse.Namespace, log: Log = _progress, capture: bool = True) -> Job:
    """Load the volume, plan the sweep and capture its slices (``capture=False``: leave that to
    :func:`capture_and_send`, which overlaps it with the analysis)."""
    from MiniGPTMedSlicerLib import scene as S
    from MiniGPTMedSlicerLib.sweep import capture_sweep, parse_range, plan_sweep

    prepare_out(args.out)
    ctx, vol, sl = _setup(args, log)
    try:
        full = plan_sweep(sl, vol)
        try:
            rng = parse_range(args.range, full.slice_count)
            plan = plan_sweep(sl, vol, rng, args.step)
        except ValueError as e:
            raise RunnerError(str(e)) from None
        log(f"sweeping {len(plan.indices)} of {full.slice_count} {args.view} slices (step {args.step})")
        captured = capture_sweep(sl, plan, export_size=args.export_size) if capture else []
    except BaseException:
        S.close(ctx)
        raise
    return Job(args, ctx, vol, sl, captured, plan=plan)


def send(client, job: Job, log: Log = _progress, cancel: threading.Event | None = None) -> Answer:
    """Post the job's requests and wait for the answers (network only: safe off the main thread). ``cancel`` stops
    before the next request."""
    from MiniGPTMedSlicerLib.sweep import SweepProgress, analyze_sweep

    t0 = time.perf_counter()
    if job.is_sweep:

        def progress(p: SweepProgress) -> None:
            log(str(p))

        args = job.args
        responses = analyze_sweep(
            client, job.captured, args.task, args.question, args.batch_size, cancel=cancel, progress=progress
        )
    else:
        return _ask(client, job.request, job.args, cancel)
    return Answer(responses, time.perf_counter() - t0)


def capture_and_send(client, job: Job, log: Log = _progress) -> Answer:
    """A sweep whose slices are captured here (MRML: the main thread) batch by batch while the batches already
    captured are being analysed (network only, one sender thread): the backend works while MRML reslices. Fills
    ``job.captured``; the answers come back in slice order."""
    import dataclasses
    from concurrent.futures import Future, ThreadPoolExecutor

    from MiniGPTMedSlicerLib.sweep import SweepProgress, analyze_sweep, capture_sweep

    args, plan = job.args, job.plan
    size = max(1, args.batch_size)
    total = len(plan.offsets_mm)
    t0 = time.perf_counter()
    done = [0]

    def analyse(chunk: list) -> list:
        out = analyze_sweep(client, chunk, args.task, args.question, size)
        done[0] += len(chunk)
        log(str(SweepProgress(done[0], total, time.perf_counter() - t0)))
        return out

    futures: list[Future] = []
    with ThreadPoolExecutor(1, thread_name_prefix="sweep-send") as pool:
        for a in range(0, total, size):
            if any(f.done() and f.exception() is not None for f in futures):
                break  # a batch failed: stop capturing, its error is raised below
            part = dataclasses.replace(
                plan, indices=plan.indices[a : a + size], offsets_mm=plan.offsets_mm[a : a + size]
            )
            chunk = capture_sweep(job.sl, part, export_size=args.export_size)
            job.captured.extend(chunk)
            futures.append(pool.submit(analyse, chunk))
        responses = [r for f in futures for r in f.result()]
    return Answer(responses, time.perf_counter() - t0)


def finish(job: Job, answer: Answer, health, log: Log = _progress) -> tuple[int, dict]:
    """Put the answers in the scene as markups and write the outputs (main thread). Returns the exit code and what
    ``findings.json`` holds. The caller closes ``job.ctx``."""
    return (_finish_sweep if job.is_sweep else _finish_analyze)(job, answer, health, log)


def _finish_analyze(job: Job, answer: Answer, health, log: Log) -> tuple[int, dict]:
    from MiniGPTMedSlicerLib import markups as M
    from MiniGPTMedSlicerLib import scene as S

    from .render import render_slice_view

    args, ctx, sl, captured = job.args, job.ctx, job.sl, job.captured
    response = answer.responses[0]
    log(f"{len(response.findings)} finding(s) in {answer.elapsed_s:.2f} s")
    nodes = M.add_analysis_results(ctx.scene, captured, response)
    findings = []
    for f, roi in zip(response.findings, nodes.rois, strict=False):
        c = M.roi_center(roi)
        findings.append(
            {
                "label": f.label,
                "score": f.score,
                "box_px": f.box,
                "roi_center_ras": [round(float(v), 4) for v in c],
                "roi_size_mm": [round(float(v), 4) for v in roi.GetSize()],
                "roi_node": roi.GetID(),
            }
        )
    data = {
        "task": args.task,
        "question": args.question,
        "view": args.view,
        "slice_offset_mm": captured.slice_offset_mm,
        "image": {
            "width": captured.width,
            "height": captured.height,
            "pixel_spacing_mm": list(captured.pixel_spacing_mm),
            "modality": captured.modality,
            "window": captured.window,
            "level": captured.level,
        },
        "pixel_to_ras": np.asarray(captured.pixel_to_ras).round(6).tolist(),
        "engine": response.engine,
        "model": response.model,
        "text": response.text,
        "raw_output": response.raw_output,
        "warnings": response.warnings,
        "timings_ms": response.timings_ms,
        "findings": findings,
    }
    if answer.conversation is not None:
        data["conversation"] = [dataclasses.asdict(t) for t in answer.conversation.turns]
    _write_json(os.path.join(args.out, "findings.json"), data)
    code = _review_and_export(args, ctx, log)
    render_slice_view(ctx.app_logic, sl, os.path.join(args.out, "view.png"), (args.view_size, args.view_size))
    if args.scene == "full":
        S.save_mrb(ctx, os.path.join(args.out, "scene.mrb"))
    log(f"wrote {args.out}/findings.json, input.png, view.png{', scene.mrb' if args.scene == 'full' else ''}")
    return code, data


def _finish_sweep(job: Job, answer: Answer, health, log: Log) -> tuple[int, dict]:
    from MiniGPTMedSlicerLib import markups as M
    from MiniGPTMedSlicerLib import scene as S
    from MiniGPTMedSlicerLib.merge3d import MergeOptions
    from MiniGPTMedSlicerLib.sweep import merge_sweep, summarize

    from .render import render_slice_view

    args, ctx, sl, captured, plan = job.args, job.ctx, job.sl, job.captured, job.plan
    elapsed = answer.elapsed_s
    findings = merge_sweep(
        captured, answer.responses, plan, MergeOptions(min_overlap=args.min_overlap, max_gap=args.max_gap)
    )
    summary = summarize(findings, plan, args.view, health.engine, health.model)
    nodes = M.add_sweep_results(
        ctx.scene,
        findings,
        task=args.task,
        engine=health.engine,
        model=health.model,
        view_name=sl.GetSliceNode().GetName(),
        summary=summary,
        offsets_mm=plan.offsets_mm,
    )
    out = []
    for f, roi in zip(findings, nodes.rois, strict=False):
        out.append(
            {
                "label": f.label,
                "isolated": f.isolated,
                "best_score": f.best_score,
                "diameter_mm": None if f.diameter_mm is None else round(f.diameter_mm, 2),
                "volume_ml": None if f.volume_ml is None else round(f.volume_ml, 4),
                "center_ras": [round(v, 4) for v in f.center_ras],
                "size_mm": [round(v, 4) for v in f.size_mm],
                "axes": f.axes,
                "slices": [plan.indices[p] for p in f.slice_positions],
                "slice_offsets_mm": [round(plan.offsets_mm[p], 4) for p in f.slice_positions],
                "best_slice": plan.indices[f.best_slice_pos],
                "boxes_px": [list(b) for b in f.boxes],
                "roi_node": roi.GetID(),
            }
        )
    data = {
        "task": args.task,
        "question": args.question,
        "view": args.view,
        "slices": plan.indices,
        "slice_offsets_mm": plan.offsets_mm,
        "engine": health.engine,
        "model": health.model,
        "elapsed_s": round(elapsed, 3),
        "slices_per_s": round(len(plan.indices) / max(elapsed, 1e-9), 2),
        "findings": out,
        "summary": summary,
    }
    _write_json(os.path.join(args.out, "findings.json"), data)
    code = _review_and_export(args, ctx, log)
    if findings:
        sl.SetSliceOffset(plan.offsets_mm[findings[0].best_slice_pos])
    render_slice_view(ctx.app_logic, sl, os.path.join(args.out, "view.png"), (args.view_size, args.view_size))
    if args.scene == "full":
        S.save_mrb(ctx, os.path.join(args.out, "scene.mrb"))
    log(
        f"{len(plan.indices)} slices in {elapsed:.1f} s ({len(plan.indices) / max(elapsed, 1e-9):.1f} slices/s); "
        f"wrote {args.out}/findings.json, view.png{', scene.mrb' if args.scene == 'full' else ''}"
    )
    return code, data


def _run_one(args: argparse.Namespace, prepare: Callable[[argparse.Namespace], Job]) -> int:
    from MiniGPTMedSlicerLib import scene as S

    job = prepare(args)
    try:
        with _backend(args.backend) as url:
            client = _client(url, args)
            health = client.health()
            _progress(f"backend {url}: engine {health.engine}, model {health.model}")
            answer = capture_and_send(client, job) if job.is_sweep and not job.captured else send(client, job)
            client.close()
        code, data = finish(job, answer, health)
        if not answer.printed:
            print(data["summary"] if job.is_sweep else data["text"])
        return code
    finally:
        S.close(job.ctx)


def run_analyze(args: argparse.Namespace) -> int:
    return _run_one(args, prepare_analyze)


def run_sweep_cmd(args: argparse.Namespace) -> int:
    return _run_one(args, lambda a: prepare_sweep(a, capture=False))


def run_series(args: argparse.Namespace) -> int:
    from MiniGPTMedSlicerLib import dicom_series

    if not os.path.exists(args.folder):
        raise RunnerError(f"{args.folder}: no such file or folder")
    found = dicom_series.scan(args.folder)
    if not found:
        raise RunnerError(f"{args.folder}: no DICOM image series found (searched recursively)")
    print("#  series UID  modality  description  slices  size")
    for line in dicom_series.describe(found):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    args = build_parser().parse_args(argv)
    from MiniGPTMedSlicerLib.client import BackendError
    from MiniGPTMedSlicerLib.review import ReviewError

    from .pacs import PacsError

    try:
        if args.command == "series":
            return run_series(args)
        if args.command == "batch":
            from .cohort import run_batch

            return run_batch(args)
        validate(args)
        if args.command == "analyze":
            return run_analyze(args)
        return run_sweep_cmd(args)
    except BackendError as e:
        message = str(e)
        if e.status == 401:
            message = (
                f"the backend at {args.backend} needs an access token: pass --token or set MINIGPTMED_TOKEN"
                if not args.token
                else f"the backend at {args.backend} refused the token: check --token or MINIGPTMED_TOKEN"
            )
        print(f"minigptmed-slicer: error: {message}", file=sys.stderr, flush=True)
        return 2
    except (RunnerError, ReviewError, PacsError) as e:
        print(f"minigptmed-slicer: error: {e}", file=sys.stderr, flush=True)
        return 2
    except ValueError as e:
        print(f"minigptmed-slicer: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if getattr(args, "_download", None):
            import shutil

            shutil.rmtree(args._download, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
