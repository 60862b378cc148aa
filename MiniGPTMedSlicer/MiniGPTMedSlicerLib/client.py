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
* Streaming (``"stream": true``): :meth:`BackendClient.stream_request` builds the call and a :class:`StreamReader`
  turns the bytes of its answer, fed as they arrive by any transport, into text deltas and the final response;
  :meth:`BackendClient.stream` is the blocking iterator over ``requests``. Closing it (or
  :meth:`BackendClient.cancel_request` with its ``request_id``) stops the model on the server.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generator, Iterator, List, Optional, Sequence, Union

import requests

from . import protocol
from .protocol import (
    DEFAULT_URL,
    REQUEST_ID_HEADER,
    STREAM_DELTA,
    STREAM_DONE,
    STREAM_ERROR,
    AnalyzeRequest,
    AnalyzeResponse,
    BatchRequest,
    BatchResponse,
    CancelResult,
    Health,
    ImageUpload,
    SliceValues,
    StoredImage,
)
from .sse import SseParser


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

    def upload_request(self, image: str, values: Optional[SliceValues] = None) -> HttpRequest:
        """``POST /v1/images``: store an image (base64) and its values for follow-up questions -> StoredImage."""
        body = protocol.to_dict(ImageUpload(image=image, values=values))
        return self._build("POST", "/v1/images", body, self.timeouts.analyze_s, lambda d: self._parse(StoredImage, d))

    def stream_request(self, request: AnalyzeRequest) -> HttpRequest:
        """``POST /v1/analyze`` with ``"stream": true``: read its answer with a :class:`StreamReader`."""
        body = protocol.to_dict(dataclasses.replace(request, stream=True))
        call = self._build(
            "POST", "/v1/analyze", body, self.timeouts.analyze_s, lambda d: self._parse(AnalyzeResponse, d)
        )
        call.headers["Accept"] = "text/event-stream"
        call.stream = True
        return call

    def cancel_request_call(self, request_id: str) -> HttpRequest:
        """``DELETE /v1/requests/{id}`` (the id from a response's X-Request-ID header) -> CancelResult."""
        return self._build(
            "DELETE", f"/v1/requests/{request_id}", None, self.timeouts.health_s, lambda d: self._parse(CancelResult, d)
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

    def upload(self, image: str, values: Optional[SliceValues] = None) -> StoredImage:
        return self.send(self.upload_request(image, values))

    def cancel_request(self, request_id: str) -> CancelResult:
        return self.send(self.cancel_request_call(request_id))

    def stream(self, request: AnalyzeRequest) -> AnalyzeStream:
        """The answer as it is written: iterate for text deltas; then ``.response`` holds the AnalyzeResponse.
        ``.request_id`` is known once the stream opened; ``.close()`` stops it (and the model)."""
        return AnalyzeStream(self, request)

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
        if request.stream and resp.status_code == 200 and is_event_stream(resp.headers.get("content-type")):
            reader = StreamReader(self, request)  # a streamed call sent by a blocking transport: read it whole
            reader.feed(resp.content)
            return reader.finish()
        return self.result(request, HttpResponse(resp.status_code, resp.reason or "", resp.content, resp.url))


class StreamReader:
    """A streamed ``/v1/analyze`` answer read from bytes fed as they arrive (any transport): :meth:`feed` returns the
    text deltas in them; after the ``done`` event ``response`` holds the AnalyzeResponse; an ``error`` event raises
    the :class:`BackendError` it means (the same wording as a non-streamed error)."""

    def __init__(self, client: BackendClient, request: HttpRequest):
        self.client, self.request = client, request
        self.parser = SseParser()
        self.response: Optional[AnalyzeResponse] = None
        self.text = ""

    def feed(self, chunk: bytes) -> List[str]:
        out: List[str] = []
        for ev in self.parser.feed(chunk):
            if ev.event == STREAM_DELTA:
                try:
                    piece = protocol.from_dict(protocol.StreamDelta, ev.json()).text
                except (ValueError, protocol.ProtocolError) as e:
                    raise self._bad(e) from e
                self.text += piece
                out.append(piece)
            elif ev.event == STREAM_DONE:
                try:
                    data = ev.json()
                except ValueError as e:
                    raise self._bad(e) from e
                self.response = self.request.parse(data)
            elif ev.event == STREAM_ERROR:
                body = ev.data.encode("utf-8")
                status = _status_of_error(ev.data)
                decode_response(HttpResponse(status, "", body, self.request.url), self.client.base_url)
        return out

    def finish(self) -> AnalyzeResponse:
        """The end of the bytes: the final response, or the error of a stream that ended without one."""
        if self.response is None:
            raise BackendError(
                "connection", f"The backend at {self.client.base_url} ended the answer before it was done."
            )
        return self.response

    def _bad(self, e: Exception) -> BackendError:
        return BackendError("protocol", f"The backend sent a stream event this module does not understand ({e}).")


def is_event_stream(content_type: Optional[str]) -> bool:
    """Whether an answer's Content-Type is server-sent events (a streamed analysis)."""
    return (content_type or "").startswith("text/event-stream")


def _status_of_error(data: str) -> int:
    try:
        code = json.loads(data)["error"]["code"]
        return protocol.ERROR_STATUS.get(code, 500)
    except (ValueError, KeyError, TypeError):
        return 500


class AnalyzeStream:
    """Blocking streamed analysis over ``requests`` (the runner; worker threads)."""

    def __init__(self, client: BackendClient, request: AnalyzeRequest):
        self.client = client
        self.call = client.stream_request(request)
        self.reader = StreamReader(client, self.call)
        self.request_id: Optional[str] = None
        self._resp: Optional[requests.Response] = None

    @property
    def response(self) -> Optional[AnalyzeResponse]:
        return self.reader.response

    def __iter__(self) -> Iterator[str]:
        c, call = self.client, self.call
        try:
            resp = c._session.post(
                call.url,
                data=call.body,
                headers=call.headers,
                timeout=(call.connect_timeout_s, call.read_timeout_s),
                verify=c.verify_tls,
                stream=True,
            )
        except requests.exceptions.ConnectionError as e:
            raise c.connection_error() from e
        except requests.exceptions.Timeout as e:
            raise c.read_timeout_error(call) from e
        self._resp = resp
        self.request_id = resp.headers.get(REQUEST_ID_HEADER)
        try:
            if resp.status_code != 200 or not is_event_stream(resp.headers.get("content-type")):
                c.result(call, HttpResponse(resp.status_code, resp.reason or "", resp.content, resp.url))
                raise BackendError("protocol", "The backend did not stream its answer. Is it an older version?")
            try:
                for chunk in resp.iter_content(chunk_size=None):
                    yield from self.reader.feed(chunk)
            except requests.exceptions.RequestException as e:
                if self._resp is None:
                    raise BackendError("cancelled", "Cancelled.") from e
                raise c.other_error(str(e)) from e
            self.reader.finish()
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection: the server cancels the request (its batch row is dropped within a decode step)."""
        resp, self._resp = self._resp, None
        if resp is not None:
            resp.close()


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
    stream: bool = False  # the answer is server-sent events (read with a StreamReader; the result is the final one)

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
