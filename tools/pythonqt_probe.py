"""Exit 0 when it runs inside a working PythonQt host (``../shared/pythonqt/run.sh tools/pythonqt_probe.py``):
`make test` uses it to decide whether the host's Debian runtime must be installed."""

import sys

import PythonQt  # noqa: F401  (built into the host)
import qt

app = qt.QApplication.instance()
label = qt.QLabel("probe")
sys.exit(0 if app is not None and label.property("text") == "probe" else 3)
