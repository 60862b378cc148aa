"""The panel's HTTP on Qt's own asynchronous ``QNetworkAccessManager``: no Python thread at all.

Inside Slicer the main thread keeps the GIL while Qt idles, so a Python worker thread runs only while main-thread
Python runs (docs/benchmarks.md has the numbers). Here the bytes move in C++ on the event loop; Python runs only to
build a request and to read an answer, on the main thread, between event-loop turns. The calls themselves (what to
send, how to read the answer, how failures are worded) are the Lib's (``MiniGPTMedSlicerLib.client``), the same as
over ``requests``. Wrapped by PythonQt on Slicer 5.8 and 5.10 (the network kit) and by PySide6.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from MiniGPTMedSlicerLib.client import (
    PAUSE,
    BackendClient,
    BackendError,
    Calls,
    HttpRequest,
    HttpResponse,
    StreamReader,
    is_event_stream,
)
from MiniGPTMedSlicerLib.protocol import REQUEST_ID_HEADER

from .qt_compat import qt


class QtRunner:
    """Runs a job's calls on the main thread's event loop: each :class:`HttpRequest` goes out through one shared
    ``QNetworkAccessManager``; its answer resumes the calls from the reply's ``finished`` signal. ``on_done`` is called
    (on the main thread) once the job's result or error is in the job. A streamed call (server-sent events) is read
    as its bytes arrive (``readyRead``): the text so far goes into ``job.streamed`` and ``on_delta(job)`` is called;
    its read timeout counts from the last bytes that came (a stream still writing has answered).
    Cancel (``logic.cancel(job)``) sends ``DELETE /v1/requests/{id}`` for a streamed call whose id came in its
    headers, then aborts the reply (at once for the other calls: a client that goes away cancels its request too).
    :meth:`close` (the panel's cleanup, before Slicer destroys its widget and with it the manager and its replies)
    drops every callback that comes afterwards: a reply's end, Cancel's wait for the DELETE, a retry's timer."""

    on_main_thread = True
    #: how long Cancel waits for the DELETE's answer before it aborts the reply anyway
    cancel_wait_ms = 2000

    def __init__(self, parent, on_done: Optional[Callable[[], None]] = None, on_delta: Optional[Callable] = None):
        self.manager = qt.QNetworkAccessManager(parent)
        self.parent = parent
        self.on_done = on_done
        self.on_delta = on_delta
        self.closed = False

    def run(self, job, client: BackendClient, calls: Calls) -> None:
        _Run(self, job, client, calls).step(None, None)

    def close(self) -> None:
        """No callback runs from now on (the Qt objects they would touch may be deleted by then); nothing is sent."""
        self.closed = True


class _Run:
    """One job's calls in flight."""

    def __init__(self, runner: QtRunner, job, client: BackendClient, calls: Calls):
        self.runner, self.job, self.client, self.calls = runner, job, client, calls
        self.reply: Any = None
        self.timer: Any = None
        self.timed_out = False
        self.reader: Optional[StreamReader] = None  # the streamed call in flight
        self.request_id: Optional[str] = None  # its id (X-Request-ID), once its headers came
        self.deleting: Any = None  # the DELETE of a cancelled stream
        self.stream_error: Optional[BackendError] = None  # an error event read while the stream came in

    def step(self, value: Any, error: Optional[BaseException]) -> None:
        if self.runner.closed:
            return
        job = self.job
        try:
            if job.cancel.is_set():
                raise BackendError("cancelled", "Cancelled.")
            item = self.calls.throw(error) if error is not None else self.calls.send(value)
        except StopIteration as stop:
            self._finish(stop.value, None)
            return
        except BaseException as e:  # reported to the panel through the job
            self._finish(None, e)
            return
        if item is PAUSE:
            qt.QTimer.singleShot(0, lambda: self.step(None, None))
        else:
            self._send(item, 0)

    def _finish(self, result: Any, error: Optional[BaseException]) -> None:
        job = self.job
        job.result, job.error = result, error
        job.abort = None
        self.client.close()
        job.done.set()
        if self.runner.on_done is not None:
            self.runner.on_done()

    def _send(self, request: HttpRequest, attempt: int) -> None:
        if self.runner.closed:
            return
        q = qt.QNetworkRequest(qt.QUrl(request.url))
        for k, v in request.headers.items():
            q.setRawHeader(qt.QByteArray(k.encode("latin-1")), qt.QByteArray(v.encode("latin-1")))
        manager = self.runner.manager
        if request.method == "GET":
            reply = manager.get(q)
        else:
            reply = manager.post(q, qt.QByteArray(request.body or b""))
        self.reply, self.timed_out = reply, False
        self.reader, self.request_id = (StreamReader(self.client, request) if request.stream else None), None
        self.stream_error = None
        self.timer = qt.QTimer(self.runner.parent)
        self.timer.setSingleShot(True)
        self.timer.setInterval(int(1000 * request.read_timeout_s))  # connect failures come from Qt itself
        self.timer.timeout.connect(self._on_timeout)
        self.timer.start()
        self.job.abort = lambda: self._cancel(reply)
        if request.stream:
            reply.metaDataChanged.connect(lambda: self._on_headers(reply))
            reply.readyRead.connect(lambda: self._on_ready_read(reply))
        reply.finished.connect(lambda: self._on_finished(reply, request, attempt))

    # -- a streamed answer ---------------------------------------------------------------------

    def _streaming(self, reply) -> bool:
        """The reply is a stream being answered (200, server-sent events), not an error body to read at the end."""
        status = reply.attribute(qt.QNetworkRequest.HttpStatusCodeAttribute)
        content_type = reply.header(qt.QNetworkRequest.ContentTypeHeader)
        return (
            status is not None
            and int(status) == 200
            and is_event_stream(None if content_type is None else str(content_type))
        )

    def _on_headers(self, reply) -> None:
        if self.request_id is None and not self.runner.closed:
            self.request_id = _raw_header(reply, REQUEST_ID_HEADER) or None

    def _on_ready_read(self, reply) -> None:
        if self.runner.closed or self.reader is None or reply is not self.reply or not self._streaming(reply):
            return  # an error body: read whole when the reply finishes
        self.timer.start()  # the read timeout counts from a stream's last bytes (as requests' does), not from the call
        self._on_headers(reply)
        try:
            pieces = self.reader.feed(bytes(reply.readAll().data()))
        except BackendError as e:  # an error event: the call's error once the reply finishes
            self.stream_error = e
            return
        if pieces and not self.job.cancel.is_set():
            self.job.streamed = self.reader.text
            if self.runner.on_delta is not None:
                self.runner.on_delta(self.job)

    # -- cancel --------------------------------------------------------------------------------

    def _cancel(self, reply) -> None:
        """Cancel: a stream whose id is known is named in a DELETE first (the reply is aborted once that is
        answered, or after ``cancel_wait_ms``); any other call is aborted at once."""
        if self.runner.closed:
            return
        if self.reader is None or self.request_id is None or self.deleting is not None:
            reply.abort()
            return
        call = self.client.cancel_request_call(self.request_id)
        q = qt.QNetworkRequest(qt.QUrl(call.url))
        for k, v in call.headers.items():
            q.setRawHeader(qt.QByteArray(k.encode("latin-1")), qt.QByteArray(v.encode("latin-1")))
        self.deleting = self.runner.manager.deleteResource(q)
        deleting = self.deleting

        def abort() -> None:
            if self.reply is reply and not self.runner.closed:
                reply.abort()

        def answered() -> None:
            if not self.runner.closed:
                deleting.deleteLater()
                abort()

        deleting.finished.connect(answered)
        qt.QTimer.singleShot(int(self.runner.cancel_wait_ms), abort)

    def _on_timeout(self) -> None:
        if self.reply is not None and not self.runner.closed:
            self.timed_out = True
            self.reply.abort()

    def _on_finished(self, reply, request: HttpRequest, attempt: int) -> None:
        if self.runner.closed:
            return
        self.timer.stop()
        self.timer.deleteLater()
        self.reply = None
        self.job.abort = None
        status = reply.attribute(qt.QNetworkRequest.HttpStatusCodeAttribute)
        value: Any = None
        error: Optional[BaseException] = None
        reader, self.reader = self.reader, None
        try:
            if self.job.cancel.is_set() and reader is not None:
                raise BackendError("cancelled", "Cancelled.")
            if self.stream_error is not None:
                raise self.stream_error
            if status is not None and not self.timed_out and reader is not None and self._streaming(reply):
                reader.feed(bytes(reply.readAll().data()))  # what came after the last readyRead
                value = reader.finish()
            elif status is not None and not self.timed_out:
                reason = reply.attribute(qt.QNetworkRequest.HttpReasonPhraseAttribute)
                body = bytes(reply.readAll().data())
                response = HttpResponse(int(status), "" if reason is None else str(reason), body, request.url)
                value = self.client.result(request, response)
            else:
                raise self._transport_error(reply, request)
        except BackendError as e:
            error = e
        finally:
            reply.deleteLater()
        if isinstance(error, BackendError) and request.may_retry(error, attempt) and not self.job.cancel.is_set():
            delay_ms = int(1000 * request.retry_delay_s(attempt))
            qt.QTimer.singleShot(delay_ms, lambda: self._send(request, attempt + 1))
            return
        self.step(value, error)

    def _transport_error(self, reply, request: HttpRequest) -> BackendError:
        if self.timed_out:
            return self.client.read_timeout_error(request)
        code = reply.error()
        R = qt.QNetworkReply
        if code == R.OperationCanceledError:
            return BackendError("cancelled", "Cancelled.")
        if code == R.HostNotFoundError:
            return self.client.dns_error()
        if code in (R.ConnectionRefusedError, R.RemoteHostClosedError):
            return self.client.connection_error()
        if code == R.TimeoutError:
            return self.client.connect_timeout_error()
        if code == R.SslHandshakeFailedError:
            return self.client.tls_error(str(reply.errorString()))
        return self.client.other_error(str(reply.errorString()))


def _raw_header(reply, name: str) -> str:
    """A response header's value ("" when absent): PySide6 6.12 takes the name as a str, Qt 5's PythonQt as a
    QByteArray."""
    for arg in (name, qt.QByteArray(name.encode("latin-1"))):
        try:
            raw = reply.rawHeader(arg)
        except TypeError:
            continue
        return bytes(raw.data()).decode("latin-1").strip()
    return ""
