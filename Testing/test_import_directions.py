"""Which part may import which, read from the source with ``ast`` (every import, also the lazy ones inside functions,
``importlib.import_module("...")`` and ``__import__("...")`` with a literal name):

- the Slicer extension (the module script and the panel) never imports the backend or the headless tools;
- ``MiniGPTMedSlicerLib`` (the Qt-free core) neither, nor Qt (qt, qtpy, PySide, PyQt, PythonQt, ctk, the panel);
- the backend imports only the wire from the Lib (``MiniGPTMedSlicerLib.protocol``, and ``.sse``: the event-stream
  framing, stdlib only, which the openai engine reads a remote server's stream with), never Qt or the headless tools;
- the engines (``backend/engines/``) import no HTTP framework (fastapi, starlette, uvicorn), not even through the
  backend modules they import (checked over the import graph, parent packages included);
- the model packages (``backend/minigpt/``, ``backend/xraygpt/``) import no engine, also not through other modules;
- the headless tools import no Qt.

The checker is also run on small trees holding one forbidden import each, and on a copy of the real tree with one
forbidden import added, to show that it reports them.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

#: top-level folder of each package in the repository (the Lib and the panel live inside the module folder)
PACKAGE_DIRS = {
    "MiniGPTMedSlicerLib": "MiniGPTMedSlicer/MiniGPTMedSlicerLib",
    "MiniGPTMedSlicerQt": "MiniGPTMedSlicer/MiniGPTMedSlicerQt",
    "backend": "backend",
    "headless": "headless",
}
#: the module script(s) at the top of the module folder, by module name
MODULE_SCRIPTS = {"MiniGPTMedSlicer": "MiniGPTMedSlicer/MiniGPTMedSlicer.py"}

QT = ("qt", "qtpy", "PySide2", "PySide6", "PyQt5", "PyQt6", "PythonQt", "ctk", "MiniGPTMedSlicerQt")
HTTP_FRAMEWORKS = ("fastapi", "starlette", "uvicorn")


@dataclass(frozen=True)
class Rule:
    scope: tuple[str, ...]  # module name prefixes the rule applies to
    banned: tuple[str, ...]  # module name prefixes that scope may not import
    allowed: tuple[str, ...] = ()  # exceptions inside the banned prefixes
    transitive: bool = False  # also through the repository's own modules that scope imports
    why: str = ""


RULES = (
    Rule(
        ("MiniGPTMedSlicer", "MiniGPTMedSlicerQt"),
        ("backend", "headless"),
        why="the Slicer extension imports no backend or headless",
    ),
    Rule(("MiniGPTMedSlicerLib",), ("backend", "headless", *QT), why="the Lib imports no backend, headless or Qt"),
    Rule(
        ("backend",),
        ("MiniGPTMedSlicerLib", "headless", *QT),
        allowed=("MiniGPTMedSlicerLib.protocol", "MiniGPTMedSlicerLib.sse"),
        why="the backend imports only the wire (protocol, sse) from the Lib",
    ),
    Rule(("backend.engines",), HTTP_FRAMEWORKS, transitive=True, why="engines import no HTTP framework"),
    Rule(
        ("backend.minigpt", "backend.xraygpt"),
        ("backend.engines",),
        transitive=True,
        why="the model packages import no engine",
    ),
    Rule(("headless",), QT, why="the headless tools import no Qt"),
)


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def module_files(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of the repository's packages and the module script."""
    out: dict[str, Path] = {}
    for pkg, rel in PACKAGE_DIRS.items():
        base = root / rel
        for p in sorted(base.rglob("*.py")) if base.is_dir() else []:
            parts = [pkg, *p.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = p
    for name, rel in MODULE_SCRIPTS.items():
        if (root / rel).is_file():
            out[name] = root / rel
    return out


def imported_names(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of everything ``module`` imports; ``from X import a`` gives ``X.a``; relative imports are
    resolved against the module's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                parts = package.split(".") if package else []
                keep = len(parts) - (n.level - 1)
                base = ".".join(parts[: max(keep, 0)] + ([n.module] if n.module else []))
            else:
                base = n.module or ""
            out += [(n.lineno, f"{base}.{a.name}" if base else a.name) for a in n.names]
        elif (
            isinstance(n, ast.Call)
            and n.args
            and isinstance(n.args[0], ast.Constant)
            and isinstance(n.args[0].value, str)
            and (
                (isinstance(n.func, ast.Name) and n.func.id == "__import__")
                or (isinstance(n.func, ast.Attribute) and n.func.attr == "import_module")
            )
        ):
            out.append((n.lineno, n.args[0].value))
    return out


def _repo_modules_of(name: str, files: dict[str, Path]) -> list[str]:
    """The repository modules that importing ``name`` runs: the longest prefix that is a module, and its parents."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in files:
            return [".".join(parts[:i]) for i in range(1, k + 1) if ".".join(parts[:i]) in files]
    return []


def check(root: Path) -> list[str]:
    """Every forbidden import under ``root``, one line each: ``file:line imports NAME (rule)``."""
    files = module_files(root)
    direct = {m: imported_names(m, p) for m, p in files.items()}
    problems: list[str] = []
    for module, path in files.items():
        for rule in RULES:
            if not _matches(module, rule.scope):
                continue
            # (line in this file, name, the chain of repository modules it came through)
            todo = [(line, name, (module,)) for line, name in direct[module]]
            seen: set[str] = {module}
            while todo:
                line, name, chain = todo.pop()
                if _matches(name, rule.banned) and not _matches(name, rule.allowed):
                    via = f" via {' -> '.join(chain[1:])}" if len(chain) > 1 else ""
                    problems.append(f"{path.relative_to(root)}:{line} imports {name}{via} ({rule.why})")
                    continue
                if not rule.transitive:
                    continue
                for dep in _repo_modules_of(name, files):
                    if dep not in seen:
                        seen.add(dep)
                        todo += [(line, n, (*chain, dep)) for _, n in direct[dep]]
    return sorted(set(problems))


def test_the_tree_keeps_its_import_directions():
    assert check(ROOT) == []


def test_the_checker_sees_the_real_packages():
    files = module_files(ROOT)
    for name in (
        "MiniGPTMedSlicer",
        "MiniGPTMedSlicerLib.protocol",
        "backend.engines.builtin",
        "backend.minigpt.model",
    ):
        assert name in files, name
    assert any(m.startswith("headless.") for m in files)
    # the backend really imports the protocol, so the "only protocol" exception is exercised
    assert any(
        n.startswith("MiniGPTMedSlicerLib.protocol")
        for m in files
        if m.startswith("backend")
        for _, n in imported_names(m, files[m])
    )


def _tree(tmp_path: Path, sources: dict[str, str]) -> Path:
    for rel, src in sources.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(src)
    for pkg in ("MiniGPTMedSlicer/MiniGPTMedSlicerLib", "backend", "backend/engines", "backend/minigpt", "headless"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


ALLOWED = {
    "MiniGPTMedSlicer/MiniGPTMedSlicerLib/a.py": "import numpy\nfrom . import protocol\nfrom .png import encode_png\n",
    "MiniGPTMedSlicer/MiniGPTMedSlicerLib/protocol.py": "import dataclasses\n",
    "MiniGPTMedSlicer/MiniGPTMedSlicerLib/png.py": "import zlib\n",
    "backend/app.py": "from fastapi import FastAPI\nfrom MiniGPTMedSlicerLib import protocol\n",
    "backend/service.py": "from MiniGPTMedSlicerLib.protocol import Finding\nfrom .engines.base import Engine\n",
    "backend/engines/base.py": "from ..images import decode\nimport requests\n",
    "backend/images.py": "import numpy\n",
    "backend/minigpt/model.py": "from .config import C\nfrom ..images import decode\n",
    "backend/minigpt/config.py": "import torch\n",
    "headless/runner.py": "from backend.server_thread import ServerThread\nfrom MiniGPTMedSlicerLib import scene\n",
}


def test_allowed_imports_are_not_reported(tmp_path):
    assert check(_tree(tmp_path, ALLOWED)) == []


@pytest.mark.parametrize(
    "rel, src, reported",
    [
        ("MiniGPTMedSlicer/MiniGPTMedSlicerLib/a.py", "from backend.engines.builtin import BuiltinEngine\n", "backend"),
        ("MiniGPTMedSlicer/MiniGPTMedSlicerLib/a.py", "def f():\n    import backend.server_thread\n", "backend"),
        ("MiniGPTMedSlicer/MiniGPTMedSlicerLib/a.py", "from qtpy import QtWidgets\n", "qtpy.QtWidgets"),
        ("MiniGPTMedSlicer/MiniGPTMedSlicerLib/a.py", "import PySide6.QtCore\n", "PySide6.QtCore"),
        ("MiniGPTMedSlicer/MiniGPTMedSlicerLib/a.py", "import PythonQt\n", "PythonQt"),
        ("MiniGPTMedSlicer/MiniGPTMedSlicerLib/a.py", "import qt\n", "qt"),
        ("MiniGPTMedSlicer/MiniGPTMedSlicerLib/a.py", "from headless.runner import main\n", "headless.runner.main"),
        (
            "MiniGPTMedSlicer/MiniGPTMedSlicerLib/a.py",
            "import importlib\nimportlib.import_module('backend.cli')\n",
            "backend.cli",
        ),
        ("MiniGPTMedSlicer/MiniGPTMedSlicer.py", "from backend import cli\n", "backend.cli"),
        ("backend/service.py", "from MiniGPTMedSlicerLib.client import BackendClient\n", "MiniGPTMedSlicerLib.client"),
        ("backend/service.py", "from MiniGPTMedSlicerLib import png\n", "MiniGPTMedSlicerLib.png"),
        ("backend/service.py", "import MiniGPTMedSlicerLib\n", "MiniGPTMedSlicerLib"),
        ("backend/service.py", "from headless import runner\n", "headless.runner"),
        ("backend/engines/base.py", "from fastapi import HTTPException\n", "fastapi.HTTPException"),
        ("backend/engines/base.py", "import uvicorn\n", "uvicorn"),
        ("backend/engines/base.py", "from starlette.responses import JSONResponse\n", "starlette.responses"),
        # through another backend module: engines -> backend.app -> fastapi
        ("backend/engines/base.py", "from ..app import create_app\n", "fastapi.FastAPI via backend.app"),
        ("backend/minigpt/model.py", "from ..engines.base import Engine\n", "backend.engines.base.Engine"),
        ("backend/minigpt/model.py", "from backend.engines import builtin\n", "backend.engines.builtin"),
        # through another backend module: minigpt -> backend.service -> backend.engines
        (
            "backend/minigpt/model.py",
            "from backend.service import X\n",
            "backend.engines.base.Engine via backend.service",
        ),
        ("headless/runner.py", "from qtpy import QtCore\n", "qtpy.QtCore"),
    ],
)
def test_each_forbidden_import_is_reported(tmp_path, rel, src, reported):
    sources = dict(ALLOWED)
    sources[rel] = sources.get(rel, "") + src
    problems = check(_tree(tmp_path, sources))
    assert len(problems) == 1 and problems[0].startswith(f"{rel}:") and f" imports {reported}" in problems[0], problems


def test_a_forbidden_import_added_to_the_real_tree_is_reported(tmp_path):
    """The real files, copied, with one lazy import of the backend added to the Lib's protocol module."""
    for rel in [*PACKAGE_DIRS.values(), *MODULE_SCRIPTS.values()]:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, tmp_path / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, tmp_path / rel)
    assert check(tmp_path) == []
    protocol = tmp_path / PACKAGE_DIRS["MiniGPTMedSlicerLib"] / "protocol.py"
    n = len(protocol.read_text().splitlines())
    protocol.write_text(
        protocol.read_text() + "\n\ndef _engine():\n    from backend.engines.builtin import BuiltinEngine\n"
    )
    assert check(tmp_path) == [
        f"MiniGPTMedSlicer/MiniGPTMedSlicerLib/protocol.py:{n + 4} imports backend.engines.builtin.BuiltinEngine "
        "(the Lib imports no backend, headless or Qt)"
    ]
