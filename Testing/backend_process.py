"""Start ``minigptmed-backend serve`` as a real subprocess on a free loopback port (tests and benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from backend.server_thread import free_port

ROOT = Path(__file__).resolve().parents[1]


class BackendProcess:
    def __init__(
        self, *args: str, port: int | None = None, env: dict[str, str] | None = None, token: str | None = None
    ):
        self.port = port or free_port()
        self.args = [sys.executable, "-m", "backend.cli", "serve", "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.token = token
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> str:
        import tempfile

        fd, name = tempfile.mkstemp(prefix="backend-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self.url
            except requests.exceptions.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"backend did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> BackendProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
