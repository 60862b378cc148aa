"""HTTP client for the backend, used by the Slicer module and the headless runner.

* One ``requests.Session`` per client: the TCP connection is reused (keep-alive).
* Every call has a timeout (connect, read).
* Only idempotent reads (``health``) are retried; ``analyze`` is never retried automatically.
* Every failure becomes a :class:`BackendError` whose ``message`` is fit to show to a radiologist.
* Responses are validated against the shared protocol (:mod:`.protocol`), so schema drift fails loudly.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import requests

from . import protocol
from .protocol import DEFAULT_URL, AnalyzeRequest, AnalyzeResponse, BatchRequest, BatchResponse, Health


class BackendError(Exception):
    """A call to the backend failed. ``kind`` is one of: connection, dns, tls, timeout, http, protocol, cancelled."""

    def __init__(self, kind: str, message: str, status: Optional[int] = None, code: Optional[str] = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.code = code


@dataclass
class Timeouts:
    connect_s: float = 3.0
    health_s: float = 5.0
    analyze_s: float = 300.0


class BackendClient:
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: Optional[str] = None,
        timeouts: Optional[Timeouts] = None,
        verify_tls: Union[bool, str] = True,
    ):
        url = (base_url or "").strip().rstrip("/")
        if not url:
            raise BackendError("config", "No backend URL is set.")
        if not (url.startswith("http://") or url.startswith("https://")):
            raise BackendError("config", f"The backend URL must start with http:// or https:// (got {url!r}).")
        if url.endswith("/v1"):
            url = url[:-3]
        self.base_url = url
        self.token = token or None
        self.timeouts = timeouts or Timeouts()
        self.verify_tls = verify_tls
        self._session = requests.Session()
        self._lock = threading.Lock()

    # -- public API ---------------------------------------------------------------------------

    def health(self, retries: int = 2) -> Health:
        """``GET /health`` (safe to retry: it is an idempotent read)."""
        last: Optional[BackendError] = None
        for attempt in range(retries + 1):
            try:
                data = self._request("GET", "/health", None, self.timeouts.health_s)
                return self._parse(Health, data)
            except BackendError as e:
                last = e
                if e.kind not in ("connection", "timeout") or attempt == retries:
                    raise
                time.sleep(0.2 * (attempt + 1))
        assert last is not None
        raise last

    def analyze(self, request: AnalyzeRequest, cancel: Optional[threading.Event] = None) -> AnalyzeResponse:
        data = self._request("POST", "/v1/analyze", protocol.to_dict(request), self.timeouts.analyze_s, cancel)
        return self._parse(AnalyzeResponse, data)

    def analyze_batch(
        self, requests_: Sequence[AnalyzeRequest], cancel: Optional[threading.Event] = None
    ) -> List[AnalyzeResponse]:
        body = protocol.to_dict(BatchRequest(items=list(requests_)))
        data = self._request("POST", "/v1/analyze/batch", body, self.timeouts.analyze_s, cancel)
        return self._parse(BatchResponse, data).results

    def close(self) -> None:
        self._session.close()

    # -- plumbing -----------------------------------------------------------------------------

    def _headers(self) -> Dict[str, str]:
        h = {"Accept": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def _parse(self, cls: Any, data: Any) -> Any:
        try:
            return protocol.from_dict(cls, data)
        except protocol.ProtocolError as e:
            raise BackendError(
                "protocol",
                f"The backend sent a response this module does not understand ({e}). "
                "Are the module and the backend the same version?",
            ) from e

    def _request(
        self,
        method: str,
        path: str,
        body: Optional[Dict[str, Any]],
        read_timeout: float,
        cancel: Optional[threading.Event] = None,
    ) -> Any:
        if cancel is not None and cancel.is_set():
            raise BackendError("cancelled", "Cancelled.")
        url = self.base_url + path
        payload = json.dumps(body).encode("utf-8") if body is not None else None
        headers = self._headers()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            resp = self._session.request(
                method,
                url,
                data=payload,
                headers=headers,
                timeout=(self.timeouts.connect_s, read_timeout),
                verify=self.verify_tls,
            )
        except requests.exceptions.SSLError as e:
            raise BackendError(
                "tls",
                f"TLS error talking to {self.base_url}: {_short(e)}. Check the server certificate "
                "or use http:// for a backend on this machine.",
            ) from e
        except requests.exceptions.ConnectTimeout as e:
            raise BackendError(
                "timeout", f"Could not connect to the backend at {self.base_url} within {self.timeouts.connect_s:g} s."
            ) from e
        except requests.exceptions.ReadTimeout as e:
            raise BackendError(
                "timeout", f"The backend at {self.base_url} did not answer within {read_timeout:g} s."
            ) from e
        except requests.exceptions.ConnectionError as e:
            text = str(e)
            if any(
                s in text
                for s in (
                    "Name or service not known",
                    "nodename nor servname",
                    "getaddrinfo failed",
                    "Temporary failure in name resolution",
                    "No address associated",
                )
            ):
                raise BackendError("dns", f"Cannot resolve the backend host in {self.base_url}. Check the URL.") from e
            raise BackendError(
                "connection",
                f"Cannot reach the backend at {self.base_url}. Is it running? Start it with: minigptmed-backend serve",
            ) from e
        except requests.exceptions.RequestException as e:
            raise BackendError("connection", f"Request to {self.base_url} failed: {_short(e)}") from e
        if cancel is not None and cancel.is_set():
            raise BackendError("cancelled", "Cancelled.")
        return _decode_response(resp, self.base_url)


def _decode_response(resp: requests.Response, base_url: str) -> Any:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code == 200:
        if data is None:
            raise BackendError(
                "protocol", f"The server at {base_url} did not answer with JSON. Is this a MiniGPTMedSlicer backend?"
            )
        return data
    code, message = None, None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        code = data["error"].get("code")
        message = data["error"].get("message")
    elif isinstance(data, dict) and "detail" in data:
        message = str(data["detail"])
    status = resp.status_code
    if status == 401:
        hint = "The backend needs an access token; set it in the module's Backend settings."
        raise BackendError("http", f"Not authorised (401): {message or hint}", status, code or "unauthorized")
    if status == 404 and message is None:
        message = f"{resp.url} was not found. Is {base_url} the address of a MiniGPTMedSlicer backend?"
    if status == 413:
        message = f"The request is too large for the backend: {message or 'reduce the export size.'}"
    if status >= 500 and message is None:
        message = f"The backend failed ({status} {resp.reason})."
    raise BackendError("http", f"{message or resp.reason} (HTTP {status})", status, code)


def _short(e: Exception, limit: int = 200) -> str:
    s = str(e)
    return s if len(s) <= limit else s[:limit] + "…"
