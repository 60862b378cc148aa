"""The module's Qt panel, written once for Slicer's PythonQt ``qt`` and for PySide6 (through qtpy) outside Slicer."""
