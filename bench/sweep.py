"""A 150-slice sweep: batched (POST /v1/analyze/batch) vs sequential (one POST per slice), slices per second.

Engines: the built-in engine always; a tiny MiniGPT-Med (built offline like the tests) with ``--minigptmed``.
The volume is synthetic (256 x 256 x 150, 1 mm) with a few lesions; the sweep goes through the real MRML capture,
the real HTTP backend and the 3D merge.

    .venv/bin/python bench/sweep.py [--quick] [--minigptmed]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "Testing"))


def make_volume(path: Path, slices: int) -> None:
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    kk, jj, ii = np.mgrid[:slices, :256, :256]
    vol = np.full(kk.shape, -1000.0, np.float32)  # a synthetic CT in HU: body, one lung field, a bone, nodules
    vol[((jj - 128) / 110.0) ** 2 + ((ii - 128) / 120.0) ** 2 < 1] = 40
    vol[((jj - 128) / 95.0) ** 2 + ((ii - 128) / 105.0) ** 2 < 1] = -860
    vol[((jj - 232) / 5.0) ** 2 + ((ii - 128) / 8.0) ** 2 < 1] = 700
    for (ci, cj, ck), r, hu in [((80, 90, 40), 9, 40), ((170, 150, 75), 6, 30), ((120, 60, 110), 12, 20)]:
        vol[((ii - ci) ** 2 + (jj - cj) ** 2 + (kk - ck) ** 2) < r * r] = hu
    vol += rng.normal(0, 15, vol.shape)
    sitk.WriteImage(sitk.GetImageFromArray(np.round(vol).astype(np.int16)), str(path))


def bench_engine(name: str, engine, volume: Path, slices: int, batch: int, max_new_tokens: int | None) -> list[str]:
    from MiniGPTMedSlicerLib import scene as S
    from MiniGPTMedSlicerLib.client import BackendClient
    from MiniGPTMedSlicerLib.sweep import analyze_sweep, capture_sweep, merge_sweep, plan_sweep

    from backend.server_thread import ServerThread

    ctx = S.create_scene()
    vol = S.load_volume(ctx, str(volume))
    vol.GetDisplayNode().AutoWindowLevelOff()
    vol.GetDisplayNode().SetWindowLevel(1500, -600)
    sl = S.add_slice_view(ctx, vol, "Red", "Axial", (256, 256))
    plan = plan_sweep(sl, vol)
    t0 = time.perf_counter()
    captured = capture_sweep(sl, plan)
    t_capture = time.perf_counter() - t0
    opts = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    lines = []
    with ServerThread(engine) as url:
        client = BackendClient(url)
        results = {}
        for label, bs in (("sequential", 1), (f"batched ({batch})", batch)):
            analyze_sweep(client, captured[:bs], batch_size=bs, **opts)  # warm-up
            t0 = time.perf_counter()
            responses = analyze_sweep(client, captured, batch_size=bs, **opts)
            dt = time.perf_counter() - t0
            results[label] = (dt, responses)
        client.close()
    seq_dt = results["sequential"][0]
    for label, (dt, responses) in results.items():
        findings = merge_sweep(captured, responses, plan)
        lines.append(
            f"| {name} | {label} | {len(captured)} | {dt:.2f} s | {len(captured) / dt:.1f} | "
            f"{seq_dt / dt:.2f}× | {sum(not f.isolated for f in findings)} |"
        )
    same = [[f.box for f in r.findings] for r in results["sequential"][1]] == [
        [f.box for f in r.findings] for r in results[f"batched ({batch})"][1]
    ]
    lines.append(
        f"\n{name}: capture of {len(captured)} slices {t_capture:.2f} s; batched results identical to "
        f"sequential: {same}\n"
    )
    S.close(ctx)
    return lines


def main() -> int:
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 slices instead of 150")
    ap.add_argument("--slices", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--minigptmed", action="store_true", help="also a tiny MiniGPT-Med built offline")
    args = ap.parse_args()
    slices = 40 if args.quick else args.slices
    from backend.engines.builtin import BuiltinEngine

    with tempfile.TemporaryDirectory() as tmp:
        volume = Path(tmp) / "sweep.nrrd"
        make_volume(volume, slices)
        lines = [
            "| engine | mode | slices | time | slices/s | speed-up | 3D findings |",
            "|---|---|---|---|---|---|---|",
        ]
        body = bench_engine("builtin", BuiltinEngine(), volume, slices, args.batch, None)
        if args.minigptmed:
            from minigpt_fixtures import tiny_files  # the tests' tiny model, trained offline and cached

            from backend.engines.minigptmed import MiniGPTMedEngine
            from backend.settings import MiniGPTMedSettings

            tiny = tiny_files()
            engine = MiniGPTMedEngine(
                MiniGPTMedSettings(
                    eva=str(tiny.eva),
                    llama=str(tiny.llama),
                    checkpoint=str(tiny.checkpoint),
                    model_config=str(tiny.model_config),
                    device="cpu",
                )
            )
            body += bench_engine("MiniGPT-Med (tiny, CPU)", engine, volume, slices, min(args.batch, 8), 16)
    print(f"Sweep benchmark on {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}:\n")
    print("\n".join(lines + [b for b in body if b.startswith("|")]))
    print("\n".join(b for b in body if not b.startswith("|")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
