"""Find a backend that is already serving, or start one as its own process on a free loopback port and wait for its
``/health`` (the module's self-test, scripts in Slicer's Python console).

Nothing here imports the ``backend`` package: the server runs in a separate Python (``python -m backend.cli serve``),
so Slicer's interpreter never loads FastAPI or torch.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from typing import IO, List, Optional, Sequence

from .client import DEFAULT_URL, BackendClient, BackendError, Timeouts

LOOPBACK = "127.0.0.1"


class LocalBackend:
    """A backend at ``url``; ``process`` is set when this helper started it (then :meth:`stop` ends it)."""

    def __init__(self, url: str, process: Optional[subprocess.Popen] = None, log: Optional[IO[bytes]] = None) -> None:
        self.url = url
        self.process = process
        self._log = log

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the process this helper started (a backend found running is left alone)."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_serving(url: str, engine: Optional[str] = None, timeout_s: float = 2.0) -> bool:
    """True when ``url`` answers ``GET /health`` with a valid health record (from ``engine``, when given)."""
    try:
        client = BackendClient(url, timeouts=Timeouts(connect_s=timeout_s, health_s=timeout_s))
    except BackendError:
        return False
    try:
        health = client.health(retries=0)
        return engine is None or health.engine == engine
    except BackendError:
        return False
    finally:
        client.close()


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_launcher(python: str, scripts: Sequence[Optional[str]] = ()) -> Optional[List[str]]:
    """The command that runs the backend's CLI: ``python -m backend.cli`` when this interpreter can import the backend
    and its server (FastAPI, uvicorn), else the first existing ``minigptmed-backend`` script among ``scripts`` or on
    PATH; None when there is neither."""
    needed = ("backend.cli", "fastapi", "uvicorn")
    try:
        have_backend = all(importlib.util.find_spec(m) is not None for m in needed)
    except ImportError:  # a parent package that is not installed
        have_backend = False
    if have_backend:
        return [python, "-m", "backend.cli"]
    for script in (*scripts, shutil.which("minigptmed-backend")):
        if script and os.path.isfile(script):
            return [script]
    return None


def start_backend(
    launcher: Sequence[str],
    engine: str = "builtin",
    cwd: Optional[str] = None,
    timeout_s: float = 60.0,
    log_path: Optional[str] = None,
) -> LocalBackend:
    """Start ``<launcher> serve --engine <engine>`` on a free loopback port and wait until it answers ``/health``.
    Raises RuntimeError when the process exits first or does not answer within ``timeout_s`` (it is then stopped)."""
    port = free_port()
    command = [*launcher, "serve", "--engine", engine, "--host", LOOPBACK, "--port", str(port)]
    log = open(log_path, "wb") if log_path else None
    proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT if log else None)
    backend = LocalBackend(f"http://{LOOPBACK}:{port}", proc, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_serving(backend.url, timeout_s=1.0):
            return backend
        if proc.poll() is not None:
            backend.stop()
            raise RuntimeError(f"the backend exited with code {proc.returncode}: {' '.join(command)}")
        time.sleep(0.1)
    backend.stop()
    raise RuntimeError(f"the backend did not answer at {backend.url} within {timeout_s:g} s: {' '.join(command)}")


def find_or_start_backend(
    launcher: Optional[Sequence[str]],
    url: str = DEFAULT_URL,
    engine: str = "builtin",
    cwd: Optional[str] = None,
    timeout_s: float = 60.0,
) -> Optional[LocalBackend]:
    """The ``engine`` backend serving at ``url`` if there is one, else a new one started with ``launcher`` (None when
    there is no launcher either)."""
    if is_serving(url, engine):
        return LocalBackend(url)
    if launcher is None:
        return None
    return start_backend(launcher, engine=engine, cwd=cwd, timeout_s=timeout_s)
