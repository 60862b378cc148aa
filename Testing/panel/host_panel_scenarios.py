"""The panel scenarios (panel_scenarios.py) as a script for the PythonQt host (../shared/pythonqt/run.sh), the way
Slicer runs the panel: ``run.sh Testing/panel/host_panel_scenarios.py CONFIG.json``.

CONFIG: ``{"urls": {...}, "volume": path of the test CT volume, "tmp_dir": ..., "dicom_dir": a CT series or null, "only": [names] or null,
"repeat": n}``. Writes ``{"build", "pythonqt", "results": {name: {"ok", "error", "s", "data"}}}`` as JSON to
``$PQHOST_RESULT`` and exits 0; a failed scenario is reported there, not by the exit status.
"""

import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "MiniGPTMedSlicer"), HERE]  # this checkout before anything installed


def main() -> None:
    with open(sys.argv[1]) as f:
        config = json.load(f)
    import panel_scenarios as PS
    from MiniGPTMedSlicerLib import scene as S
    from MiniGPTMedSlicerQt.qt_compat import IS_PYTHONQT

    ctx = S.create_scene()
    vol = S.load_volume(ctx, config["volume"])
    for name, orient in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        S.add_slice_view(ctx, vol, name, orient, (256, 256))
    env = PS.Env(
        mrml=ctx, ui=PS.Ui(), urls=config["urls"], tmp_dir=config["tmp_dir"], dicom_dir=config.get("dicom_dir")
    )
    results = {}
    names = config.get("only") or list(PS.SCENARIOS)
    for name in names:
        runs = []
        for _ in range(int(config.get("repeat", 1))):
            t0 = time.monotonic()
            entry = {"ok": True, "error": "", "data": {}}
            try:
                entry["data"] = PS.SCENARIOS[name](env) or {}
            except BaseException:
                entry["ok"] = False
                entry["error"] = traceback.format_exc(limit=6)
            finally:
                env.close()
            entry["s"] = time.monotonic() - t0
            runs.append(entry)
        results[name] = runs[0] if len(runs) == 1 else {**runs[-1], "runs": runs}
    out = {
        "build": os.environ.get("PQHOST_SLICER", ""),
        "pythonqt": IS_PYTHONQT,
        "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("PySide6", "qtpy", "PyQt5", "PyQt6")),
        "results": results,
    }
    with open(os.environ["PQHOST_RESULT"], "w") as f:
        json.dump(out, f)
    S.close(ctx)


main()
sys.exit(0)
