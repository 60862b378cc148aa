"""The Slicer extension's files: CMake lists every module file, the extension is well formed, module code parses as
Python 3.9 (Slicer 5.6) and the Qt-free core imports no Qt."""

from __future__ import annotations

import ast
import re

import pytest
from conftest import ROOT

MODULE = ROOT / "MiniGPTMedSlicer"
PACKAGES = ("MiniGPTMedSlicerLib", "MiniGPTMedSlicerQt")


def _module_py_files() -> list[str]:
    return sorted(str(p.relative_to(MODULE)) for pkg in PACKAGES for p in (MODULE / pkg).glob("*.py"))


def test_module_cmakelists_lists_every_file():
    text = (MODULE / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"^\s+(MiniGPTMedSlicer(?:Lib|Qt)/\S+\.py)\s*$", text, re.M))
    assert listed == set(_module_py_files()), "MiniGPTMedSlicer/CMakeLists.txt must list every module .py file"
    # only what runs inside Slicer: the module script and its two packages (not the headless tools, not the backend)
    scripts = set(re.findall(r"^\s+(\S+\.py)\s*$", text, re.M))
    assert scripts == listed | {"${MODULE_NAME}.py"}, scripts - listed
    assert "${MODULE_NAME}.py" in text and "slicerMacroBuildScriptedModule" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    for res in re.findall(r"^\s+(Resources/\S+)\s*$", text, re.M):
        assert (MODULE / res.replace("${MODULE_NAME}", "MiniGPTMedSlicer")).is_file(), res


def test_extension_cmakelists_is_a_slicer_extension():
    text = (ROOT / "CMakeLists.txt").read_text()
    for needle in (
        "project(MiniGPTMedSlicer)",
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(MiniGPTMedSlicer)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert needle in text, needle
    assert (MODULE / "Testing" / "CMakeLists.txt").is_file() and (
        MODULE / "Testing" / "Python" / "CMakeLists.txt"
    ).is_file()


@pytest.mark.parametrize("rel", ["MiniGPTMedSlicer.py", *_module_py_files()])
def test_module_code_parses_as_python_39(rel):
    src = (MODULE / rel).read_text()
    tree = ast.parse(src, feature_version=(3, 9))
    assert not any(isinstance(n, ast.Match) for n in ast.walk(tree))


def test_module_follows_the_scripted_module_template():
    tree = ast.parse((MODULE / "MiniGPTMedSlicer.py").read_text())
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes["MiniGPTMedSlicer"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["MiniGPTMedSlicerWidget"]
    # the Logic is the Qt-free AnalysisLogic plus Slicer glue (AnalysisLogic first: Slicer's base calls super().__init__())
    assert classes["MiniGPTMedSlicerLogic"] == ["AnalysisLogic", "ScriptedLoadableModuleLogic"]
    assert classes["MiniGPTMedSlicerTest"] == ["ScriptedLoadableModuleTest"]
    assert "MiniGPTMedSlicerParameterNode" in classes


def test_core_imports_no_qt():
    for p in (MODULE / "MiniGPTMedSlicerLib").glob("*.py"):
        tree = ast.parse(p.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        bad = [n for n in names if n.split(".")[0] in ("qt", "qtpy", "PySide6", "PyQt5", "ctk", "MiniGPTMedSlicerQt")]
        assert not bad, f"{p.name} imports {bad}"


def test_ui_file_loads_and_has_the_panel_widgets(qtbot):
    from MiniGPTMedSlicerQt.qt_compat import find, load_ui

    w = load_ui(str(MODULE / "Resources" / "UI" / "MiniGPTMedSlicer.ui"))
    qtbot.addWidget(w)
    for name in (
        "backendUrlLineEdit",
        "tokenLineEdit",
        "testConnectionButton",
        "viewComboBox",
        "taskComboBox",
        "questionLineEdit",
        "analyzeButton",
        "cancelButton",
        "progressBar",
        "findingsTable",
        "clearResultsButton",
        "conversationTextEdit",
        "followUpLineEdit",
        "newConversationButton",
    ):
        find(w, name)
    assert find(w, "taskComboBox").count() == 0  # the panel fills it from protocol.TASK_TABLE


# Q_PROPERTYs whose getter PythonQt shadows with an attribute (so ``w.text()`` raises TypeError inside Slicer), from
# the project's Qt notes. Read them with qt_compat.prop(w, name) instead.
_SHADOWED_GETTERS = {
    "objectName",
    "toolTip",
    "windowTitle",
    "width",
    "height",
    "styleSheet",
    "text",
    "placeholderText",
    "count",
    "currentIndex",
    "currentText",
    "currentData",
    "rowCount",
    "columnCount",
    "value",
    "minimum",
    "maximum",
    "format",
    "interval",
    "remainingTime",
    "informativeText",
    "detailedText",
    "checked",
    "enabled",
    "visible",
    "title",
    "plainText",
    "readOnly",
}
_QT_CODE = [
    "MiniGPTMedSlicer.py",
    "MiniGPTMedSlicerQt/panel.py",
    "MiniGPTMedSlicerQt/qt_compat.py",
    "MiniGPTMedSlicerQt/qt_transport.py",
]


def _pythonqt_problems(src: str) -> list[str]:
    problems = []
    for n in ast.walk(ast.parse(src)):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            name, recv = n.func.attr, n.func.value
            font_metrics = isinstance(recv, ast.Call) and ast.unparse(recv.func).endswith(
                ("font_metrics", "fontMetrics")
            )
            if name in _SHADOWED_GETTERS and not n.args and not n.keywords and not font_metrics:
                problems.append(f"line {n.lineno}: .{name}() is shadowed by a property in PythonQt; use prop()")
            if name == "fontMetrics" and not n.args:
                problems.append(f"line {n.lineno}: widget.fontMetrics() raises on Slicer 5.8; use font_metrics(w)")
            if (
                name == "connect"
                and n.args
                and isinstance(n.args[0], ast.Constant)
                and isinstance(n.args[0].value, str)
            ):
                problems.append(f"line {n.lineno}: string-signature connect() fails under PySide6")
            if name == "exec_":
                problems.append(f"line {n.lineno}: use exec()")
        if isinstance(n, ast.Assign | ast.AugAssign):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            for t in targets:
                # self.parent.title = ... is the scripted-module template's own idiom (runs only in Slicer)
                if (
                    isinstance(t, ast.Attribute)
                    and t.attr in _SHADOWED_GETTERS
                    and ast.unparse(t.value) != "self.parent"
                ):
                    problems.append(f"line {n.lineno}: assigning .{t.attr} does nothing under PySide6; call the setter")
        if isinstance(n, ast.Attribute) and ast.unparse(n) == "qt.QThread":
            problems.append(f"line {n.lineno}: Slicer 5.8's PythonQt has no qt.QThread")
        if isinstance(n, ast.ClassDef):
            bases = [ast.unparse(b) for b in n.bases]
            if any(b.endswith(("QThread", "QRunnable")) for b in bases):
                problems.append(f"line {n.lineno}: a Python QThread/QRunnable crashes Slicer; use threading + QTimer")
        if isinstance(n, ast.ImportFrom) and n.module == "__feature__":
            problems.append(f"line {n.lineno}: PySide6 __feature__ leaks into other modules")
        # scoped enums (qt.Qt.AlignmentFlag.AlignLeft) need Slicer >= 5.10: short names only
        if (
            isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute)
            and isinstance(n.value.value, ast.Attribute)
        ):
            chain = ast.unparse(n)
            parts = chain.split(".")
            if parts[0] == "qt" and len(parts) == 4 and all(p[:1].isupper() for p in parts[1:]):
                problems.append(f"line {n.lineno}: scoped enum {chain}; use the short name")
    return problems


@pytest.mark.parametrize("rel", _QT_CODE)
def test_qt_code_follows_the_pythonqt_rules(rel):
    assert _pythonqt_problems((MODULE / rel).read_text()) == []


def test_pythonqt_rule_check_catches_the_pitfalls():
    bad = (
        "w.text = 'x'\nv = w.text()\nb.connect('clicked()', f)\nqt.Qt.AlignmentFlag.AlignLeft\nd.exec_()\n"
        "class T(qt.QThread):\n    pass\nh = w.fontMetrics().height()\n"
    )
    assert len(_pythonqt_problems(bad)) == 8
    assert (
        _pythonqt_problems(
            "w.setText('x')\nv = prop(w, 'text')\nb.clicked.connect(f)\nqt.Qt.AlignLeft\n"
            "h = font_metrics(t).height()\ns.value('k', '')\n"
        )
        == []
    )


def test_icon_is_a_128_pixel_png():
    import struct

    data = (MODULE / "Resources" / "Icons" / "MiniGPTMedSlicer.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (128, 128)


_TYPE_NAMES = {"int", "str", "float", "bool", "bytes", "list", "dict", "tuple", "set", "type", "object"}


def _is_qt(node: ast.AST) -> bool:
    """qt.Qt.AlignLeft | qt.Qt.AlignTop combines flags; it is not a type union."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and (node.id in ("qt", "Qt") or node.id.startswith("Q"))


def _py310_runtime_uses(src: str) -> list[str]:
    """What parses as 3.9 but fails at run time on Slicer 5.6's Python 3.9: ``X | Y`` unions outside annotations,
    zip(strict=), itertools.pairwise, dataclass(slots=/kw_only=)."""
    tree = ast.parse(src)
    in_annotation = {
        id(m)
        for n in ast.walk(tree)
        for a in ("annotation", "returns")
        if getattr(n, a, None) is not None
        for m in ast.walk(getattr(n, a))
    }
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) and id(n) not in in_annotation:
            sides = (n.left, n.right)
            typeish = [
                s
                for s in sides
                if (isinstance(s, ast.Constant) and s.value is None)
                or (isinstance(s, ast.Name) and (s.id in _TYPE_NAMES or s.id[:1].isupper()))
                or (isinstance(s, ast.Attribute) and s.attr[:1].isupper() and not _is_qt(s))
            ]
            if len(typeish) == 2:
                found.append(f"line {n.lineno}: {ast.unparse(n)}")
        if isinstance(n, ast.Call):
            fn = ast.unparse(n.func)
            kws = {k.arg for k in n.keywords}
            if (
                (fn == "zip" and "strict" in kws)
                or fn.endswith("pairwise")
                or (fn.endswith("dataclass") and kws & {"slots", "kw_only"})
            ):
                found.append(f"line {n.lineno}: {ast.unparse(n)[:60]}")
    return found


@pytest.mark.parametrize("rel", ["MiniGPTMedSlicer.py", *_module_py_files()])
def test_module_code_runs_on_python_39(rel):
    assert _py310_runtime_uses((MODULE / rel).read_text()) == []


def test_python_39_check_catches_310_only_code():
    bad = "isinstance(x, int | None)\nT = A | B\nzip(a, b, strict=True)\nitertools.pairwise(a)\n@dataclass(slots=True)\nclass C: pass\n"
    assert len(_py310_runtime_uses(bad)) == 5
    assert _py310_runtime_uses(
        "def f(x: int | None) -> A | B: pass\nflags = a | b\nm = qt.Qt.AlignLeft | qt.Qt.AlignTop\n"
        "t = pathlib.Path | None\n"
    ) == ["line 4: pathlib.Path | None"]
