"""Run a script inside the PythonQt host (``../shared/pythonqt``): PythonQt embedded the way 3D Slicer embeds it, on
Qt 5.15, offscreen, the main thread keeping the GIL while idle, as in Slicer.

``run_script(path, slicer="5.10"|"5.8", args=...)`` starts ``run.sh path args...`` with ``PQHOST_STRICT=1`` (a
traceback printed from a Qt callback fails the run) and ``VIRTUAL_ENV`` set to this interpreter's venv (so
slicer-core, numpy and requests import there), and returns the JSON the script wrote to ``$PQHOST_RESULT``.

Where the host is: ``$PQHOST_DIR``, else ``../shared/pythonqt`` beside the repository. Its Debian runtime packages
are installed by ``make test`` (``tools/pythonqt_runtime.sh``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILDS = ("5.10", "5.8")  # the Slicer releases whose PythonQt the host carries


def host_dir() -> Path:
    return Path(os.environ.get("PQHOST_DIR") or ROOT.parent / "shared" / "pythonqt").resolve()


def unavailable_reason() -> str | None:
    """None when the host can run here, else why not and how to fix it (one line)."""
    d = host_dir()
    if not (d / "run.sh").is_file():
        return f"no PythonQt host at {d} (set PQHOST_DIR, or put ../shared/pythonqt beside the repository)"
    probe = subprocess.run(
        [str(d / "run.sh"), str(ROOT / "tools" / "pythonqt_probe.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=host_env("5.10"),
    )
    if probe.returncode != 0:
        tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
        return (
            f"the PythonQt host does not start ({tail[0]}): install its runtime with "
            f"'sudo {d}/install-runtime.sh' (make test does it when run as root)"
        )
    return None


def host_env(slicer: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QT_API", "PYTEST_"))}
    d = host_dir()
    env.update(
        PQHOST_SLICER=slicer,
        PQHOST_STRICT="1",
        VIRTUAL_ENV=sys.prefix,
        # the host's own `qt` package, listed again: the 5.8 build finds it through a symlink that a copy may lose
        PQHOST_SITE_DIRS=str(d / "python"),
        PQHOST_PYTHON=sys.executable,
        QT_QPA_PLATFORM="offscreen",
    )
    env.pop("PYTHONPATH", None)  # the script puts this checkout first on sys.path itself
    env.update(extra or {})
    return env


class HostError(RuntimeError):
    pass


def run_script(
    script: Path, slicer: str = "5.10", args: list[str] | None = None, timeout_s: float = 300, env=None
) -> dict:
    """Run ``script`` in the host for that Slicer build; return the JSON it wrote to ``$PQHOST_RESULT``."""
    fd, result = tempfile.mkstemp(prefix="pqhost-", suffix=".json")
    os.close(fd)
    os.unlink(result)
    try:
        proc = subprocess.run(
            [str(host_dir() / "run.sh"), str(script), *(args or [])],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=host_env(
                slicer, {"PQHOST_RESULT": result, "PQHOST_TIMEOUT_MS": str(int(timeout_s * 1000)), **(env or {})}
            ),
            cwd=ROOT,
        )
        if not os.path.exists(result):
            raise HostError(
                f"the host (Slicer {slicer}) exited with {proc.returncode} and wrote no result:\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )
        with open(result) as f:
            data = json.load(f)
        data["_returncode"] = proc.returncode
        data["_stderr"] = proc.stderr[-6000:]
        return data
    finally:
        if os.path.exists(result):
            os.unlink(result)
