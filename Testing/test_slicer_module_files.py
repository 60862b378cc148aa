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
    assert "${MODULE_NAME}.py" in text and "slicerMacroBuildScriptedModule" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    for res in re.findall(r"^\s+(Resources/\S+)\s*$", text, re.M):
        assert (MODULE / res.replace("${MODULE_NAME}", "MiniGPTMedSlicer")).is_file(), res


def test_extension_cmakelists_is_a_slicer_extension():
    text = (ROOT / "CMakeLists.txt").read_text()
    for needle in ("project(MiniGPTMedSlicer)", "EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS",
                   "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS",
                   "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(MiniGPTMedSlicer)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in text, needle
    assert (MODULE / "Testing" / "CMakeLists.txt").is_file() and (MODULE / "Testing" / "Python" / "CMakeLists.txt").is_file()


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
    assert classes["MiniGPTMedSlicerLogic"] == ["ScriptedLoadableModuleLogic"]
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
    for name in ("backendUrlLineEdit", "tokenLineEdit", "testConnectionButton", "viewComboBox", "taskComboBox",
                 "questionLineEdit", "analyzeButton", "cancelButton", "progressBar", "findingsTable", "clearResultsButton"):
        find(w, name)
    assert find(w, "taskComboBox").count() == 6
