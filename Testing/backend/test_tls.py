"""TLS: the backend serves HTTPS with --ssl-certfile/--ssl-keyfile, the client verifies certificates and explains a
TLS failure. The certificate is made at test time with the system's openssl (self-signed, for 127.0.0.1)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import requests
from backend_process import BackendProcess
from MiniGPTMedSlicerLib.client import BackendClient, BackendError

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(crt),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return crt, key


def test_https_backend_and_certificate_checks(cert):
    crt, key = cert
    bp = BackendProcess("--engine", "builtin", "--ssl-certfile", str(crt), "--ssl-keyfile", str(key))
    bp_url = f"https://127.0.0.1:{bp.port}"
    bp.proc = subprocess.Popen(bp.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=bp.env)
    try:
        t_end = time.monotonic() + 60
        while time.monotonic() < t_end:
            try:
                if requests.get(f"{bp_url}/health", verify=str(crt), timeout=1).ok:
                    break
            except requests.exceptions.RequestException:
                time.sleep(0.1)
        health = BackendClient(bp_url, verify_tls=str(crt)).health()
        assert health.engine == "builtin"
        with pytest.raises(BackendError) as e:
            BackendClient(bp_url).health(retries=0)  # self-signed: not trusted by default
        assert e.value.kind == "tls" and "certificate" in e.value.message.lower()
        with pytest.raises(BackendError) as e:
            BackendClient(f"http://127.0.0.1:{bp.port}").health(retries=0)  # plain HTTP to a TLS port
        assert e.value.kind in ("connection", "protocol")
    finally:
        bp.proc.kill()
        bp.proc.wait(10)
