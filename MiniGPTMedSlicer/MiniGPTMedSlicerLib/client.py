"""HTTP client for the backend, used by the Slicer module and the headless runner.

* The calls are built and their answers read without any transport (:meth:`BackendClient.health_request`,
  :meth:`BackendClient.analyze_request`, :meth:`BackendClient.batch_request` give an :class:`HttpRequest`;
  :meth:`BackendClient.result` reads an :class:`HttpResponse`; the ``*_error`` methods word transport failures), so
  the same client runs over ``requests`` (here: :meth:`BackendClient.send`, blocking, for the runner and worker
  threads) and over Qt's asynchronous ``QNetworkAccessManager`` (the panel, MiniGPTMedSlicerQt/qt_transport.py:
  no Python thread, so nothing waits for the GIL that Slicer's main thread keeps).
* A sequence of calls is written once as a generator that yields :class:`HttpRequest` objects and receives their
  results (:data:`PAUSE` lets an event loop run in between); :func:`run_calls` drives one with :meth:`send`.
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
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence, Union

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

    # -- calls, built without a transport -------------------------------------------------------

    def health_request(self, retries: int = 2) -> HttpRequest:
        """``GET /health`` (safe to retry: it is an idempotent read)."""
        return self._build("GET", "/health", None, self.timeouts.health_s, lambda d: self._parse(Health, d), retries)

    def analyze_request(self, request: AnalyzeRequest) -> HttpRequest:
        body = protocol.to_dict(request)
        return self._build(
            "POST", "/v1/analyze", body, self.timeouts.analyze_s, lambda d: self._parse(AnalyzeResponse, d)
        )

    def batch_request(self, requests_: Sequence[AnalyzeRequest]) -> HttpRequest:
        body = protocol.to_dict(BatchRequest(items=list(requests_)))
        return self._build(
            "POST", "/v1/analyze/batch", body, self.timeouts.analyze_s, lambda d: self._parse(BatchResponse, d).results
        )

    def result(self, request: HttpRequest, response: HttpResponse) -> Any:
        """The call's result from the server's answer, or the :class:`BackendError` it means (raised)."""
        return request.parse(decode_response(response, self.base_url))

    # -- how transport failures are worded (the same for every transport) ----------------------

    def connection_error(self) -> BackendError:
        return BackendError(
            "connection",
            f"Cannot reach the backend at {self.base_url}. Is it running? Start it with: minigptmed-backend serve",
        )

    def dns_error(self) -> BackendError:
        return BackendError("dns", f"Cannot resolve the backend host in {self.base_url}. Check the URL.")

    def tls_error(self, detail: str) -> BackendError:
        return BackendError(
            "tls",
            f"TLS error talking to {self.base_url}: {_short(detail)}. Check the server certificate "
            "or use http:// for a backend on this machine.",
        )

    def connect_timeout_error(self) -> BackendError:
        return BackendError(
            "timeout", f"Could not connect to the backend at {self.base_url} within {self.timeouts.connect_s:g} s."
        )

    def read_timeout_error(self, request: HttpRequest) -> BackendError:
        return BackendError(
            "timeout", f"The backend at {self.base_url} did not answer within {request.read_timeout_s:g} s."
        )

    def other_error(self, detail: str) -> BackendError:
        return BackendError("connection", f"Request to {self.base_url} failed: {_short(detail)}")

    # -- the blocking transport (requests) -------------------------------------------------------

    def health(self, retries: int = 2) -> Health:
        return self.send(self.health_request(retries))

    def analyze(self, request: AnalyzeRequest, cancel: Optional[threading.Event] = None) -> AnalyzeResponse:
        return self.send(self.analyze_request(request), cancel)

    def analyze_batch(
        self, requests_: Sequence[AnalyzeRequest], cancel: Optional[threading.Event] = None
    ) -> List[AnalyzeResponse]:
        return self.send(self.batch_request(requests_), cancel)

    def send(self, request: HttpRequest, cancel: Optional[threading.Event] = None) -> Any:
        """Send one call with ``requests`` and wait for its result (retrying connection failures and time-outs of
        idempotent reads)."""
        for attempt in range(request.retries + 1):
            try:
                return self._send_once(request, cancel)
            except BackendError as e:
                if not request.may_retry(e, attempt):
                    raise
                time.sleep(request.retry_delay_s(attempt))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._session.close()

    # -- plumbing -----------------------------------------------------------------------------

    def _headers(self) -> Dict[str, str]:
        h = {"Accept": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def _build(
        self, method: str, path: str, body: Optional[Dict[str, Any]], read_timeout: float, parse, retries: int = 0
    ) -> HttpRequest:
        payload = json.dumps(body).encode("utf-8") if body is not None else None
        headers = self._headers()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        return HttpRequest(
            method, self.base_url + path, headers, payload, self.timeouts.connect_s, read_timeout, parse, retries
        )

    def _parse(self, cls: Any, data: Any) -> Any:
        try:
            return protocol.from_dict(cls, data)
        except protocol.ProtocolError as e:
            raise BackendError(
                "protocol",
                f"The backend sent a response this module does not understand ({e}). "
                "Are the module and the backend the same version?",
            ) from e

    def _send_once(self, request: HttpRequest, cancel: Optional[threading.Event]) -> Any:
        if cancel is not None and cancel.is_set():
            raise BackendError("cancelled", "Cancelled.")
        try:
            resp = self._session.request(
                request.method,
                request.url,
                data=request.body,
                headers=request.headers,
                timeout=(request.connect_timeout_s, request.read_timeout_s),
                verify=self.verify_tls,
            )
        except requests.exceptions.SSLError as e:
            raise self.tls_error(str(e)) from e
        except requests.exceptions.ConnectTimeout as e:
            raise self.connect_timeout_error() from e
        except requests.exceptions.ReadTimeout as e:
            raise self.read_timeout_error(request) from e
        except requests.exceptions.ConnectionError as e:
            if any(s in str(e) for s in _DNS_FAILURES):
                raise self.dns_error() from e
            raise self.connection_error() from e
        except requests.exceptions.RequestException as e:
            raise self.other_error(str(e)) from e
        if cancel is not None and cancel.is_set():
            raise BackendError("cancelled", "Cancelled.")
        return self.result(request, HttpResponse(resp.status_code, resp.reason or "", resp.content, resp.url))


_DNS_FAILURES = (
    "Name or service not known",
    "nodename nor servname",
    "getaddrinfo failed",
    "Temporary failure in name resolution",
    "No address associated",
)


@dataclass
class HttpRequest:
    """One call to the backend, ready for any transport: what to send, and how to read the answer."""

    method: str
    url: str
    headers: Dict[str, str]
    body: Optional[bytes]
    connect_timeout_s: float
    read_timeout_s: float
    parse: Callable[[Any], Any]  # the answer's JSON -> the call's result (protocol types)
    retries: int = 0  # only for idempotent reads

    def may_retry(self, error: BackendError, attempt: int) -> bool:
        return error.kind in ("connection", "timeout") and attempt < self.retries

    def retry_delay_s(self, attempt: int) -> float:
        return 0.2 * (attempt + 1)


@dataclass
class HttpResponse:
    """What a transport got back: the status line and the raw body."""

    status: int
    reason: str
    body: bytes
    url: str


class _Pause:
    def __repr__(self) -> str:
        return "PAUSE"


#: Yielded by a sequence of calls to let an event loop run before it goes on (a blocking driver just goes on).
PAUSE = _Pause()

#: A sequence of calls: yields :class:`HttpRequest` (or :data:`PAUSE`), receives each result, returns the outcome.
Calls = Generator[Any, Any, Any]


def run_calls(calls: Calls, client: BackendClient, cancel: Optional[threading.Event] = None) -> Any:
    """Drive ``calls`` with the blocking transport in the calling thread; return what it returns."""
    value: Any = None
    error: Optional[BaseException] = None
    while True:
        try:
            item = calls.throw(error) if error is not None else calls.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        if item is PAUSE:
            continue
        try:
            value = client.send(item, cancel)
        except BackendError as e:
            error = e


def decode_response(resp: HttpResponse, base_url: str) -> Any:
    """The JSON of a 200 answer, or the :class:`BackendError` a non-200 answer means (raised), with the server's
    own message when it sent one."""
    try:
        data = json.loads(resp.body.decode("utf-8")) if resp.body else None
    except ValueError:
        data = None
    if resp.status == 200:
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
    status = resp.status
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


def _short(e: object, limit: int = 200) -> str:
    s = str(e)
    return s if len(s) <= limit else s[:limit] + "…"
