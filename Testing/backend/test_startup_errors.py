"""``minigptmed-backend serve`` start-up failures as a real subprocess: one line on stderr, exit 2, no traceback
(``--debug`` shows it); the port is bound before the engine loads, and "listening" is logged once it listens."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from backend_process import ROOT, BackendProcess
from minigpt_fixtures import tiny_files


def _serve(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("minigptmed-backend: ")
    return lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--engine", "minigptmed"], "needs --eva, --llama, --checkpoint (or --converted)"),
        (["--engine", "hf", "--model", "/no/model", "--family", "medgemma"], "--model /no/model: no such folder"),
        (["--engine", "openai"], "needs --url"),
        (["--port", "99999"], "--port 99999 is out of range: use 1-65535"),
        (["--host", "no-such-host.invalid", "--token", "t"], "not a known address"),
        (["--ssl-certfile", "x.pem"], "go together"),
    ],
)
def test_startup_failures_are_one_line(args, expected):
    # warning level: the info lines ("engine: ... (why)") are log records, not part of the failure
    assert expected in _one_line(_serve("--log-level", "warning", "--port", "0", *args))


def test_debug_shows_the_traceback():
    r = _serve("--engine", "hf", "--model", "/no/model", "--port", "0", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "SettingError" in r.stderr


def test_port_in_use_fails_before_the_engine_loads():
    tiny = tiny_files()  # a real MiniGPT-Med engine whose load takes seconds (torch, weights, LoRA merge)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        r = _serve("--engine", "minigptmed", *tiny.args(), "--device", "cpu", "--port", str(port))
        elapsed = time.monotonic() - t0
    # default log level: had the engine been built, its "engine: minigptmed (...)" line would be here too
    line = _one_line(r)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "--port" in line
    assert "engine" not in r.stderr.replace("another backend", ""), r.stderr
    print(f"port in use: failed after {elapsed:.2f} s")


def test_listening_is_logged_after_the_engine_is_ready_and_a_vision_only_config_loads(tmp_path):
    tiny = tiny_files()
    cfg = json.loads(tiny.model_config.read_text())
    vision_only = tmp_path / "vision_only.json"
    vision_only.write_text(json.dumps({"vision": cfg["vision"]}))  # the LLM's size comes from the LLaMA folder
    args = [a if a != str(tiny.model_config) else str(vision_only) for a in tiny.args()]
    with BackendProcess("--engine", "minigptmed", *args, "--device", "cpu") as bp:
        log = bp.log()
    ready = log.index("engine ready")
    listening = log.index(f"listening on http://127.0.0.1:{bp.port}")
    assert ready < listening, log
