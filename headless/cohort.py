"""``minigptmed-slicer batch``: one task over a cohort of volumes, resumable, with several cases in flight.

    minigptmed-slicer batch INPUT --task report --view axial [--sweep] [--jobs N] [--force] --out DIR

INPUT is a folder (NIfTI / NRRD / MHA files and DICOM series, found recursively) or a CSV file with a ``path`` column
(relative to the CSV's folder) and optional ``series``, ``slice`` and ``question`` columns. Each case's outputs go to
``DIR/cases/<id>/`` (the runner's findings.json, input.png, view.png, and case.json); ``DIR/summary.csv`` has one
row per case, ``DIR/findings.jsonl`` one line per finding. A case is built in a hidden ``.partial`` folder and
renamed when whole, so a re-run skips every finished case (unless ``--force``) and redoes the rest, failed ones
included. Volumes load and are captured on the main thread (MRML is not thread-safe); the requests of up to
``--jobs`` cases are in flight at once, so a backend is not idle while the next volume loads.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from MiniGPTMedSlicerLib import dicom_series
from MiniGPTMedSlicerLib.protocol import DETECT, GROUND, TASKS

from . import runner as R

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
CSV_COLUMNS = ("path", "series", "slice", "question")
SUMMARY_COLUMNS = (
    "id",
    "path",
    "series",
    "slice",
    "question",
    "status",
    "error",
    "task",
    "view",
    "engine",
    "model",
    "slice_offset_mm",
    "slices",
    "findings",
    "seconds",
    "text",
)
OK, FAILED = "ok", "failed"
INTERRUPTED_EXIT = 130


@dataclass(frozen=True)
class Case:
    id: str
    path: str  # absolute
    rel: str  # as shown and as the id is made from: relative to the folder or the CSV's folder
    series: str | None = None
    slice: int | None = None
    question: str | None = None


def case_id(rel: str, series: str | None = None, slice_: int | None = None, question: str | None = None) -> str:
    """Stable: the relative path made file-name safe, and a short hash of everything that tells cases apart."""
    key = json.dumps([rel.replace(os.sep, "/"), series, slice_, question])
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.replace(os.sep, "__")).strip("._")[:80] or "case"
    return f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _is_volume_file(name: str) -> bool:
    return name.lower().endswith(VOLUME_SUFFIXES)


def find_cases(folder: str) -> list[Case]:
    """Every volume file and every DICOM series under ``folder``, in path order."""
    cases = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            if _is_volume_file(n) and not n.startswith("."):
                path = os.path.join(root, n)
                rel = os.path.relpath(path, folder)
                cases.append(Case(case_id(rel), path, rel))
    by_folder: dict[str, list[dicom_series.Series]] = {}
    for s in dicom_series.scan(folder):
        by_folder.setdefault(os.path.commonpath([os.path.dirname(f) for f in s.files]), []).append(s)
    for where, series in by_folder.items():
        rel = os.path.relpath(where, folder)
        for s in series:
            # one series in its folder: the folder is the case; several: each series by its UID
            uid = s.uid if len(series) > 1 else None
            cases.append(Case(case_id(rel, uid), where, rel if uid is None else f"{rel} [{uid}]", uid))
    return sorted(cases, key=lambda c: c.rel)


def read_csv(path: str) -> list[Case]:
    """Cases from a CSV: ``path`` (relative to the CSV's folder, or absolute), optional ``series``, ``slice``,
    ``question``. Bad rows are refused before anything runs."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            header = [h.strip() for h in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise R.RunnerError(f"{path}: cannot read this CSV ({e})") from None
    if not rows:
        raise R.RunnerError(f"{path}: no rows (a header with a 'path' column, then one row per case)")
    if "path" not in header:
        raise R.RunnerError(f"{path}: no 'path' column (columns: {', '.join(header)})")
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        raise R.RunnerError(f"{path}: unknown column(s) {', '.join(unknown)} (known: {', '.join(CSV_COLUMNS)})")
    cases, seen = [], set()
    for line, row in enumerate(rows, 2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        rel = row.get("path", "")
        if not rel:
            raise R.RunnerError(f"{path} line {line}: empty path")
        slice_text = row.get("slice", "")
        try:
            slice_ = int(slice_text) if slice_text else None
        except ValueError:
            raise R.RunnerError(f"{path} line {line}: slice {slice_text!r} is not a whole number") from None
        series, question = row.get("series") or None, row.get("question") or None
        cid = case_id(rel, series, slice_, question)
        if cid in seen:
            raise R.RunnerError(f"{path} line {line}: the same case as an earlier row")
        seen.add(cid)
        cases.append(Case(cid, os.path.join(base, rel), rel, series, slice_, question))
    return cases


def discover(input_path: str) -> list[Case]:
    if os.path.isdir(input_path):
        cases = find_cases(input_path)
        if not cases:
            raise R.RunnerError(
                f"{input_path}: no volumes (NIfTI, NRRD, MHA) or DICOM series found (searched recursively)"
            )
        return cases
    if not os.path.exists(input_path):
        raise R.RunnerError(f"{input_path}: no such file or folder")
    if input_path.lower().endswith(".csv"):
        return read_csv(input_path)
    raise R.RunnerError(f"{input_path}: give a folder of volumes or a CSV file with a 'path' column")


# -- files written whole ---------------------------------------------------------------------------------------------


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _summary_csv(records: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in SUMMARY_COLUMNS})
    return buf.getvalue()


def _finding_lines(record: dict, data: dict | None) -> str:
    if not data:
        return ""
    return "".join(
        json.dumps({"case": record["id"], "path": record["path"], **f}) + "\n" for f in data.get("findings", [])
    )


class Store:
    """``DIR/cases/<id>/`` (a case is there only when whole), ``DIR/summary.csv``, ``DIR/findings.jsonl``."""

    def __init__(self, out: str):
        self.out = out
        self.cases_dir = os.path.join(out, "cases")
        os.makedirs(self.cases_dir, exist_ok=True)
        for n in os.listdir(self.cases_dir):  # what an interrupted run left half-written
            if n.startswith(".") and n.endswith(".partial"):
                shutil.rmtree(os.path.join(self.cases_dir, n), ignore_errors=True)

    def final_dir(self, case: Case) -> str:
        return os.path.join(self.cases_dir, case.id)

    def partial_dir(self, case: Case) -> str:
        return os.path.join(self.cases_dir, f".{case.id}.partial")

    def record(self, case: Case) -> dict | None:
        try:
            with open(os.path.join(self.final_dir(case), "case.json"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def findings(self, case: Case) -> dict | None:
        try:
            with open(os.path.join(self.final_dir(case), "findings.json"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def commit(self, case: Case, record: dict, keep_outputs: bool) -> None:
        """Write case.json into the partial folder and rename it into place (a failure keeps only case.json)."""
        partial = self.partial_dir(case)
        if not keep_outputs:
            shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial, exist_ok=True)
        _write_atomic(os.path.join(partial, "case.json"), json.dumps(record, indent=2))
        final = self.final_dir(case)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)

    def discard(self, case: Case) -> None:
        shutil.rmtree(self.partial_dir(case), ignore_errors=True)

    def write_summary(self, records: list[dict]) -> None:
        _write_atomic(os.path.join(self.out, "summary.csv"), _summary_csv(records))

    def append_findings(self, record: dict, data: dict | None) -> None:
        text = _finding_lines(record, data)
        if text:
            with open(os.path.join(self.out, "findings.jsonl"), "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()

    def write_findings(self, cases: list[Case], records: dict[str, dict]) -> None:
        """Rebuilt from the finished cases (drops any line an interrupted append left)."""
        text = "".join(_finding_lines(records[c.id], self.findings(c)) for c in cases if c.id in records)
        _write_atomic(os.path.join(self.out, "findings.jsonl"), text)


# -- running ----------------------------------------------------------------------------------------------------------


def _case_args(args: argparse.Namespace, case: Case, out: str) -> argparse.Namespace:
    a = argparse.Namespace(**vars(args))
    a.volume, a.series, a.slice, a.out = case.path, case.series, case.slice, out
    a.question = case.question if case.question is not None else args.question
    a.offset = a.region = a.review = a.export_sr = a.export_table = a.export_markups = None
    a.dicomweb, a.study, a.store_sr = None, None, False
    return a


def _base_record(case: Case, args: argparse.Namespace) -> dict:
    return {
        "id": case.id,
        "path": case.rel,
        "series": case.series,
        "slice": case.slice,
        "question": case.question if case.question is not None else args.question,
        "task": args.task,
        "view": args.view,
    }


def _ok_record(case: Case, args: argparse.Namespace, data: dict, seconds: float) -> dict:
    rec = _base_record(case, args)
    rec.update(
        status=OK,
        error=None,
        engine=data.get("engine"),
        model=data.get("model"),
        slice_offset_mm=None if data.get("slice_offset_mm") is None else round(data["slice_offset_mm"], 4),
        slices=len(data.get("slices", [])) or 1,
        findings=len(data.get("findings", [])),
        seconds=round(seconds, 3),
        text=data.get("summary") if "summary" in data else data.get("text"),
    )
    return rec


def _failed_record(case: Case, args: argparse.Namespace, reason: str, seconds: float) -> dict:
    rec = _base_record(case, args)
    rec.update(status=FAILED, error=reason, seconds=round(seconds, 3))
    return rec


def _reason(e: BaseException) -> str:
    from MiniGPTMedSlicerLib.client import BackendError

    if isinstance(e, BackendError | R.RunnerError | ValueError | OSError):
        text = str(e)
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split()) or type(e).__name__


@dataclass
class _InFlight:
    case: Case
    job: R.Job
    t0: float


def validate_batch(args: argparse.Namespace) -> None:
    R.validate(args)
    if args.jobs < 1:
        raise R.RunnerError(f"--jobs {args.jobs}: use 1 or more cases in flight")
    if args.sweep and args.task not in (DETECT.id, GROUND.id):
        raise R.RunnerError(f"--sweep --task {args.task}: a sweep asks detect or ground on each slice")


def run_batch(args: argparse.Namespace) -> int:
    from MiniGPTMedSlicerLib import scene as S
    from tqdm import tqdm

    validate_batch(args)
    cases = discover(args.input)
    if args.sweep and any(c.slice is not None for c in cases):
        raise R.RunnerError("--sweep with a 'slice' column: a sweep covers the slices itself (drop one of them)")
    R.prepare_out(args.out)
    store = Store(args.out)
    records: dict[str, dict] = {}
    for c in cases:
        rec = store.record(c)
        if rec is not None:
            records[c.id] = rec
    todo = [c for c in cases if args.force or records.get(c.id, {}).get("status") != OK]
    skipped = len(cases) - len(todo)
    prepare = R.prepare_sweep if args.sweep else R.prepare_analyze

    def ordered() -> list[dict]:
        return [records[c.id] for c in cases if c.id in records]

    store.write_summary(ordered())
    store.write_findings(cases, records)
    if skipped:
        R._progress(f"{skipped} of {len(cases)} case(s) already finished in {args.out} (--force redoes them)")

    def quiet(_msg: str) -> None:
        pass

    bar = tqdm(
        total=len(cases), initial=skipped, unit="case", desc="batch", file=sys.stderr, dynamic_ncols=True, delay=0.5
    )
    failed = 0
    in_flight: dict[Future, _InFlight] = {}
    pending = iter(todo)
    interrupted = False

    def done(case: Case, rec: dict, data: dict | None, keep: bool) -> None:
        nonlocal failed
        store.commit(case, rec, keep_outputs=keep)
        records[case.id] = rec
        store.write_summary(ordered())
        store.append_findings(rec, data)
        if rec["status"] == FAILED:
            failed += 1
            bar.write(f"[minigptmed-slicer] {case.rel}: failed: {rec['error']}", file=sys.stderr)
        bar.set_postfix(failed=failed, refresh=False)
        bar.update(1)

    stop = threading.Event()  # set on Ctrl-C: the requests in flight return, no new one starts
    pool = ThreadPoolExecutor(max_workers=args.jobs, thread_name_prefix="batch-request")
    try:
        with R._backend(args.backend) as url:
            health = R._client(url, args).health()
            bar.write(
                f"[minigptmed-slicer] backend {url}: engine {health.engine}, model {health.model}", file=sys.stderr
            )

            def request(job: R.Job) -> R.Answer:
                client = R._client(url, job.args)
                try:
                    return R.send(client, job, quiet, stop)
                finally:
                    client.close()

            while True:
                while len(in_flight) < args.jobs:
                    case = next(pending, None)
                    if case is None:
                        break
                    t0 = time.perf_counter()
                    store.discard(case)
                    try:
                        job = prepare(_case_args(args, case, store.partial_dir(case)), quiet)
                    except Exception as e:
                        done(case, _failed_record(case, args, _reason(e), time.perf_counter() - t0), None, False)
                        continue
                    in_flight[pool.submit(request, job)] = _InFlight(case, job, t0)
                if not in_flight:
                    break
                finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for fut in finished:
                    item = in_flight.pop(fut)
                    try:
                        answer = fut.result()
                        _code, data = R.finish(item.job, answer, health, quiet)
                        rec, keep = _ok_record(item.case, args, data, time.perf_counter() - item.t0), True
                    except Exception as e:
                        rec, data, keep = (
                            _failed_record(item.case, args, _reason(e), time.perf_counter() - item.t0),
                            None,
                            False,
                        )
                    finally:
                        S.close(item.job.ctx)
                    done(item.case, rec, data, keep)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        for item in in_flight.values():
            S.close(item.job.ctx)
        for c in todo:  # the half-done: redone on resume
            store.discard(c)
        bar.close()
        store.write_summary(ordered())
        store.write_findings(cases, records)
    ok = sum(1 for r in records.values() if r.get("status") == OK)
    if interrupted:
        print(
            f"minigptmed-slicer: interrupted: {ok} of {len(cases)} case(s) finished in {args.out}; "
            "run the same command again to do the rest",
            file=sys.stderr,
            flush=True,
        )
        return INTERRUPTED_EXIT
    R._progress(
        f"{len(cases)} case(s): {ok} ok ({skipped} already done), {failed} failed; "
        f"wrote {os.path.join(args.out, 'summary.csv')} and findings.jsonl"
    )
    return 1 if failed else 0


def add_parser(sub) -> None:
    b = sub.add_parser(
        "batch",
        help="one task over a cohort (a folder of volumes or a CSV), resumable",
        description=(__doc__ or "").replace("``", ""),
        formatter_class=R.HelpFormatter,
    )
    b.add_argument("input", help="a folder (volumes and DICOM series, searched recursively) or a CSV with 'path'")
    b.add_argument("--task", choices=TASKS, default=DETECT.id, help="what to ask (detect or ground with --sweep)")
    b.add_argument("--sweep", action="store_true", help="sweep every case's slices and merge into 3D findings")
    b.add_argument("--jobs", type=int, default=2, help="cases whose requests are in flight at once")
    b.add_argument("--force", action="store_true", help="redo the cases a previous run finished")
    b.add_argument("--out", required=True, help="output folder (summary.csv, findings.jsonl, cases/<id>/)")
    R.view_options(b)
    R.sweep_options(b)
    b.set_defaults(scene="none")
