"""The console script as a real subprocess: binding, access token, engine choice, and the client's error messages."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests
from backend_process import BackendProcess
from conftest import b64, blob_image
from MiniGPTMedSlicerLib.client import BackendClient, BackendError
from MiniGPTMedSlicerLib.png import encode_png
from MiniGPTMedSlicerLib.protocol import AnalyzeRequest

from backend.server_thread import free_port


@pytest.fixture(scope="module")
def token_backend():
    with BackendProcess("--engine", "auto", "--token", "s3cret-token") as bp:
        yield bp


def test_auto_picks_builtin_and_says_why_and_binds_loopback(token_backend):
    log = token_backend.log()
    assert "engine: builtin (no VLM weights configured or found locally)" in log
    assert f"listening on http://127.0.0.1:{token_backend.port}" in log


def test_token_is_required_except_for_health(token_backend):
    url = token_backend.url
    body = {"task": "detect", "image": b64(encode_png(blob_image()))}
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    r = requests.post(f"{url}/v1/analyze", json=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = requests.post(f"{url}/v1/analyze", json=body, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401
    r = requests.post(f"{url}/v1/analyze", json=body, headers={"Authorization": "Bearer s3cret-token"}, timeout=30)
    assert r.status_code == 200 and r.json()["findings"]


def test_client_messages(token_backend):
    png = encode_png(blob_image())
    req = AnalyzeRequest(task="detect", image=b64(png))
    with pytest.raises(BackendError) as e:
        BackendClient(token_backend.url).analyze(req)
    assert e.value.status == 401 and "token" in e.value.message.lower()
    ok = BackendClient(token_backend.url, token="s3cret-token").analyze(req)
    assert ok.findings
    with pytest.raises(BackendError) as e:
        BackendClient(token_backend.url, token="s3cret-token").analyze(AnalyzeRequest(task="vqa", image=b64(png)))
    assert e.value.status == 400 and "question is required" in e.value.message
    with pytest.raises(BackendError) as e:
        BackendClient(f"http://127.0.0.1:{free_port()}").health(retries=0)
    assert e.value.kind == "connection" and "Is it running?" in e.value.message
    with pytest.raises(BackendError) as e:
        BackendClient("http://no-such-host.invalid:8765").health(retries=0)
    assert e.value.kind == "dns"
    with pytest.raises(BackendError) as e:
        BackendClient("localhost:8765")
    assert "http://" in e.value.message


def test_non_loopback_bind_without_token_is_refused():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "backend.cli",
            "serve",
            "--engine",
            "builtin",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "without an access token" in r.stderr


def test_token_from_environment():
    with BackendProcess("--engine", "builtin", env={"MINIGPTMED_TOKEN": "from-env"}) as bp:
        assert requests.post(f"{bp.url}/v1/analyze", json={}, timeout=10).status_code == 401
        h = {"Authorization": "Bearer from-env"}
        assert requests.post(f"{bp.url}/v1/analyze", json={}, headers=h, timeout=10).status_code == 422


def test_log_lines_have_no_pixels_or_question_text(token_backend):
    secret_q = "Patient John Doe has a nodule?"
    png = encode_png(blob_image())
    requests.post(
        f"{token_backend.url}/v1/analyze",
        json={"task": "ground", "image": b64(png), "question": secret_q},
        headers={"Authorization": "Bearer s3cret-token"},
        timeout=30,
    )
    import time

    t_end = time.monotonic() + 10  # the access line is written after the response has been sent
    log = token_backend.log()
    while "task=ground" not in log and time.monotonic() < t_end:
        time.sleep(0.05)
        log = token_backend.log()
    assert "request id=" in log and "task=ground" in log
    assert "John Doe" not in log
    assert b64(png)[:40] not in log


def test_auto_picks_a_configured_vlm_whose_weights_exist(tmp_path):
    from backend.cli import build_parser
    from backend.engines import choose_engine

    def choose(*argv):
        return choose_engine(build_parser().parse_args(["serve", *argv]))

    files = [tmp_path / n for n in ("eva_vit_g.pth", "ckpt.pth")]
    for f in files:
        f.write_bytes(b"x")
    (tmp_path / "llama").mkdir()
    assert (
        choose("--eva", str(files[0]), "--llama", str(tmp_path / "llama"), "--checkpoint", str(files[1]))[0]
        == "minigptmed"
    )
    name, why = choose(
        "--eva", str(tmp_path / "missing.pth"), "--llama", str(tmp_path / "llama"), "--checkpoint", str(files[1])
    )
    assert name == "builtin" and "no VLM" in why
    assert choose("--model", str(tmp_path / "llama"))[0] == "hf"
    assert choose("--model", "google/medgemma-1.5-4b-it", "--url", "http://127.0.0.1:9/v1")[0] == "openai"
    assert choose("--model", str(tmp_path / "not-there"))[0] == "builtin"
    assert choose("--engine", "builtin", "--model", str(tmp_path / "llama")) == ("builtin", "chosen with --engine")
