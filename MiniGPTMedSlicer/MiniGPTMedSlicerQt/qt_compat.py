"""One ``qt`` namespace for Slicer's PythonQt and for PySide6 through qtpy.

Rules the panel follows so the same code runs in both (docs/slicer-module.md, "Writing Qt code for both"): call
setters (never assign ``w.text = ...``), read properties with :func:`prop` (PythonQt shadows getters such as
``text()``), short enum names, ``signal.connect(callable)`` only, pass real ``str`` values (PythonQt shows None as
"None"), store only str ids in item data and str values in QSettings and convert on read (:func:`to_str`; PythonQt
returns stored lists as tuples), no QThread (Python threads + a QTimer poll, or Qt's own asynchronous I/O), no
``widget.fontMetrics()`` (:func:`font_metrics`).
"""

from __future__ import annotations

import os
import threading
import types


def _pythonqt_available() -> bool:
    """True inside a PythonQt host (Slicer, or any program embedding PythonQt): its ``PythonQt`` module is built in.

    ``from slicer import app`` is not the test: outside the app the ``slicer`` package can be PyPI's slicer-core,
    which has no ``app``; and PythonSlicer (a plain interpreter) has ``slicer.app`` set to None but no PythonQt."""
    try:
        import PythonQt  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


#: The panel runs on Slicer's PythonQt (else on PySide6 through qtpy).
IS_PYTHONQT = _pythonqt_available()


def in_slicer() -> bool:
    """True inside the Slicer application (``slicer.app`` exists); only calls that need the app check this."""
    try:
        from slicer import app  # type: ignore[attr-defined]
    except ImportError:
        return False
    return app is not None


def _load():
    if IS_PYTHONQT:
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
        from qtpy import QtNetwork

        for name in dir(QtNetwork):
            if name.startswith("Q"):
                setattr(ns, name, getattr(QtNetwork, name))
    except ImportError:  # pragma: no cover
        pass
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
    """True on the thread that runs the Qt event loop (the only one allowed to touch widgets or MRML).

    Slicer and the tests run the Qt event loop on Python's main thread. Not ``qt.QThread.currentThread()``: Slicer
    5.8's PythonQt has no ``qt.QThread``, and on 5.10 calling it from a worker prints warnings."""
    return threading.current_thread() is threading.main_thread()


def font_metrics(widget):
    """``widget.fontMetrics()`` raises ValueError in Slicer 5.8's PythonQt (unknown return type)."""
    return qt.QFontMetrics(prop(widget, "font"))


def to_str(v, default: str = "") -> str:
    """A QSettings value as str: None (never stored) becomes ``default``."""
    return default if v is None else str(v)
