"""The OpenAI-compatible face answers every error in OpenAI's shape, including the refusals of the pure-ASGI guard
middleware (access token 401, body too large 413), on a real server; the native routes keep the native shape."""

from __future__ import annotations

import pytest
import requests

from backend.engines.builtin import BuiltinEngine
from backend.server_thread import ServerThread
from backend.settings import ServerSettings

TOKEN = "s3cret"
OPENAI_KEYS = {"message", "type", "code", "param"}


@pytest.fixture(scope="module")
def guarded():
    with ServerThread(BuiltinEngine(), ServerSettings(token=TOKEN, max_body_bytes=4096)) as url:
        yield url


def _openai_error(r: requests.Response, status: int, code: str, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == OPENAI_KEYS, body
    assert body["error"]["code"] == code and body["error"]["type"] == kind and body["error"]["param"] is None
    assert body["error"]["message"]
    return body["error"]["message"]


def test_missing_token_is_401_in_openai_shape_on_both_openai_routes(guarded):
    msg = _openai_error(requests.get(f"{guarded}/v1/models", timeout=10), 401, "unauthorized", "invalid_request_error")
    assert "token" in msg
    r = requests.post(f"{guarded}/v1/chat/completions", json={"messages": []}, timeout=10)
    _openai_error(r, 401, "unauthorized", "invalid_request_error")
    r = requests.post(f"{guarded}/v1/analyze", json={"task": "report", "image": ""}, timeout=10)
    assert r.status_code == 401 and set(r.json()["error"]) == {"code", "message"}  # the native shape stays native


def test_body_too_large_is_413_in_openai_shape_with_and_without_content_length(guarded):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    big = b'{"messages": "' + b"x" * 8000 + b'"}'
    r = requests.post(f"{guarded}/v1/chat/completions", data=big, headers=auth, timeout=10)
    assert "4,096" in _openai_error(r, 413, "too_large", "invalid_request_error")
    chunked = requests.post(
        f"{guarded}/v1/chat/completions", data=iter([big[:4000], big[4000:]]), headers=auth, timeout=10
    )
    assert "Content-Length" not in chunked.request.headers
    _openai_error(chunked, 413, "too_large", "invalid_request_error")
    r = requests.post(f"{guarded}/v1/analyze", data=big, headers=auth, timeout=10)
    assert r.status_code == 413 and set(r.json()["error"]) == {"code", "message"}


def test_not_json_and_schema_errors_in_openai_shape(builtin_server):
    r = requests.post(f"{builtin_server}/v1/chat/completions", data=b"{not json", timeout=10)
    _openai_error(r, 400, "invalid_json", "invalid_request_error")
    r = requests.post(f"{builtin_server}/v1/chat/completions", json={"messages": []}, timeout=10)
    assert "messages" in _openai_error(r, 422, "invalid_schema", "invalid_request_error")
    r = requests.post(
        f"{builtin_server}/v1/chat/completions", json={"messages": [{"role": "user"}], "task": "x"}, timeout=10
    )
    assert "task" in _openai_error(r, 422, "invalid_schema", "invalid_request_error")
    r = requests.get(f"{builtin_server}/v1/analyze", timeout=10)  # native route, wrong method: native shape
    assert r.status_code == 405 and set(r.json()["error"]) == {"code", "message"}
