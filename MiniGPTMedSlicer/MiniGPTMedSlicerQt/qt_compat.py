"""One ``qt`` namespace for Slicer's PythonQt and for PySide6 through qtpy.

Rules the panel follows so the same code runs in both (see the project's Qt notes): call setters (never assign
``w.text = ...``), read with getters or ``property()``, short enum names, ``signal.connect(callable)`` only, pass real
``str`` values, no QThread (Python threads + a QTimer poll instead).
"""

from __future__ import annotations

import os
import types


def in_slicer() -> bool:
    try:
        from slicer import app  # type: ignore[attr-defined]
    except ImportError:
        return False
    return app is not None


def _load():
    if in_slicer():
        import qt  # type: ignore[import-not-found]

        return qt
    os.environ.setdefault("QT_API", "pyside6")
    from qtpy import QtCore, QtGui, QtWidgets

    ns = types.SimpleNamespace()
    for mod in (QtCore, QtGui, QtWidgets):
        for name in dir(mod):
            if name.startswith("Q") or name == "Qt":
                setattr(ns, name, getattr(mod, name))
    try:
        from qtpy.QtUiTools import QUiLoader

        ns.QUiLoader = QUiLoader
    except ImportError:  # pragma: no cover
        pass
    return ns


qt = _load()


def load_ui(path: str):
    """Load a plain-Qt .ui file the same way in both environments (QFile + QUiLoader)."""
    f = qt.QFile(path)
    if not f.open(qt.QFile.ReadOnly):
        raise RuntimeError(f"cannot open {path}")
    try:
        widget = qt.QUiLoader().load(f)
    finally:
        f.close()
    if widget is None:
        raise RuntimeError(f"cannot load {path}")
    return widget


def prop(obj, name: str):
    """Read a Q_PROPERTY the same way in both bindings (PythonQt shadows getters such as ``text()`` with
    attributes). A misspelt name raises instead of quietly returning None."""
    if obj.metaObject().indexOfProperty(name) < 0:
        raise AttributeError(f"{type(obj).__name__} has no Qt property {name!r}")
    return obj.property(name)


def find(root, name: str):
    w = root.findChild(qt.QObject, name)
    if w is None:
        raise LookupError(f"no widget named {name!r} in the panel")
    return w


def is_gui_thread() -> bool:
    """True on the thread that runs the Qt event loop (the only one allowed to touch widgets or MRML)."""
    app = qt.QApplication.instance()
    return app is not None and qt.QThread.currentThread() == app.thread()
