"""The console script as a real subprocess: binding, access token, engine choice, and the client's error messages."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests
from backend_process import BackendProcess
from conftest import b64, blob_image, chest_phantom, ct_request
from MiniGPTMedSlicerLib.client import BackendClient, BackendError
from MiniGPTMedSlicerLib.png import encode_png
from MiniGPTMedSlicerLib.protocol import AnalyzeRequest, from_dict

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
    body = ct_request(chest_phantom(), task="detect")
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    r = requests.post(f"{url}/v1/analyze", json=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = requests.post(f"{url}/v1/analyze", json=body, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401
    r = requests.post(f"{url}/v1/analyze", json=body, headers={"Authorization": "Bearer s3cret-token"}, timeout=30)
    assert r.status_code == 200 and r.json()["findings"]


def test_token_is_required_route_by_route(token_backend):
    """Every route but /health and the API's documentation (/docs, its assets, /openapi.json: see test_docs_offline),
    the OpenAI face included."""
    url = token_backend.url
    png = b64(encode_png(blob_image()))
    chat = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "describe"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                ],
            }
        ],
    }
    routes = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/analyze", {"task": "report", "image": png}),
        ("POST", "/v1/analyze/batch", {"items": [{"task": "report", "image": png}]}),
    ]
    good = {"Authorization": "Bearer s3cret-token"}
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            r = requests.request(method, f"{url}{path}", json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers, r.status_code)
        r = requests.request(method, f"{url}{path}", json=body, headers=good, timeout=30)
        assert r.status_code == 200, (path, r.text[:200])


def test_client_messages(token_backend):
    png = encode_png(blob_image())
    req = from_dict(AnalyzeRequest, ct_request(chest_phantom(), task="detect"))
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
    from backend.cli import build_parser, engine_settings
    from backend.engines import choose_engine

    def choose(*argv):
        return choose_engine(engine_settings(build_parser().parse_args(["serve", *argv]), {}))

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
    assert choose("--engine", "builtin", "--model", str(tmp_path / "llama")) == (
        "builtin",
        "named by the engine setting",
    )


# the flags and the environment variables that stand for them; each with a value that is not the default
_FLAG_ENV = [
    ("--eva", "MINIGPTMED_EVA", "/w/eva_vit_g.pth"),
    ("--llama", "MINIGPTMED_LLAMA", "/w/llama"),
    ("--checkpoint", "MINIGPTMED_CHECKPOINT", "/w/ckpt.pth"),
    ("--converted", "MINIGPTMED_CONVERTED", "/w/converted"),
    ("--model", "MINIGPTMED_MODEL", "/w/medgemma"),
    ("--url", "MINIGPTMED_OPENAI_URL", "http://127.0.0.1:9/v1"),
    ("--api-key", "MINIGPTMED_OPENAI_API_KEY", "k3y"),
    ("--token", "MINIGPTMED_TOKEN", "t0ken"),
    ("--static-decode", "MINIGPTMED_STATIC_DECODE", None),
    ("--trust-checkpoints", "MINIGPTMED_TRUST_CHECKPOINTS", None),
]


def test_settings_from_flags_and_from_environment_agree():
    from backend.cli import build_parser, engine_settings, server_settings
    from backend.settings import EngineSettings, ServerSettings

    argv = [x for flag, _env, value in _FLAG_ENV for x in ([flag] if value is None else [flag, value])]
    env = {var: value or "1" for _flag, var, value in _FLAG_ENV}
    flags = build_parser().parse_args(["serve", *argv])
    bare = build_parser().parse_args(["serve"])
    assert engine_settings(flags, {}) == engine_settings(bare, env)
    assert server_settings(flags, {}) == server_settings(bare, env)
    e, s = engine_settings(bare, env), server_settings(bare, env)
    m = e.minigptmed
    assert (m.eva, m.llama, m.checkpoint, m.converted) == (
        "/w/eva_vit_g.pth",
        "/w/llama",
        "/w/ckpt.pth",
        "/w/converted",
    )
    assert m.static_decode and m.trust_checkpoints
    assert e.hf.model == e.openai.model == "/w/medgemma"
    assert (e.openai.url, e.openai.api_key, s.token) == ("http://127.0.0.1:9/v1", "k3y", "t0ken")
    # nothing set: the dataclasses' own defaults
    assert engine_settings(bare, {}) == EngineSettings() and server_settings(bare, {}) == ServerSettings()
    # a flag wins over the environment
    other = build_parser().parse_args(["serve", "--llama", "/x/llama"])
    assert engine_settings(other, env).minigptmed.llama == "/x/llama"


def test_setting_errors_name_the_flag_on_the_command_line(tmp_path, capsys):
    from backend.cli import flag_message, main
    from backend.setting_error import SettingError

    err = SettingError("{llama}: folder not found", "llama")
    assert str(err) == "llama: folder not found" and flag_message(err) == "--llama: folder not found"
    trust = SettingError("turn on {trust_checkpoints}", "trust_checkpoints")
    assert "MINIGPTMED_TRUST_CHECKPOINTS=1" in flag_message(trust)
    # the hf engine without --model, and convert without its files: one line, exit 2, before anything loads
    assert main(["serve", "--engine", "hf", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "minigptmed-backend: the hf engine needs --model PATH (a local model folder)"
    ]
    assert main(["convert", "--out", str(tmp_path / "out"), "--llama", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "minigptmed-backend: convert needs --eva, --checkpoint"
