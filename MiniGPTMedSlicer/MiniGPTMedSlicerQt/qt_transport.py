"""The panel's HTTP on Qt's own asynchronous ``QNetworkAccessManager``: no Python thread at all.

Inside Slicer the main thread keeps the GIL while Qt idles, so a Python worker thread runs only while main-thread
Python runs (docs/benchmarks.md has the numbers). Here the bytes move in C++ on the event loop; Python runs only to
build a request and to read an answer, on the main thread, between event-loop turns. The calls themselves (what to
send, how to read the answer, how failures are worded) are the Lib's (``MiniGPTMedSlicerLib.client``), the same as
over ``requests``. Wrapped by PythonQt on Slicer 5.8 and 5.10 (the network kit) and by PySide6.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from MiniGPTMedSlicerLib.client import PAUSE, BackendClient, BackendError, Calls, HttpRequest, HttpResponse

from .qt_compat import qt


class QtRunner:
    """Runs a job's calls on the main thread's event loop: each :class:`HttpRequest` goes out through one shared
    ``QNetworkAccessManager``; its answer resumes the calls from the reply's ``finished`` signal. ``on_done`` is called
    (on the main thread) once the job's result or error is in the job. Cancel (``logic.cancel(job)``) aborts the
    reply in flight."""

    on_main_thread = True

    def __init__(self, parent, on_done: Optional[Callable[[], None]] = None):
        self.manager = qt.QNetworkAccessManager(parent)
        self.parent = parent
        self.on_done = on_done

    def run(self, job, client: BackendClient, calls: Calls) -> None:
        _Run(self, job, client, calls).step(None, None)


class _Run:
    """One job's calls in flight."""

    def __init__(self, runner: QtRunner, job, client: BackendClient, calls: Calls):
        self.runner, self.job, self.client, self.calls = runner, job, client, calls
        self.reply: Any = None
        self.timer: Any = None
        self.timed_out = False

    def step(self, value: Any, error: Optional[BaseException]) -> None:
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
        q = qt.QNetworkRequest(qt.QUrl(request.url))
        for k, v in request.headers.items():
            q.setRawHeader(qt.QByteArray(k.encode("latin-1")), qt.QByteArray(v.encode("latin-1")))
        manager = self.runner.manager
        if request.method == "GET":
            reply = manager.get(q)
        else:
            reply = manager.post(q, qt.QByteArray(request.body or b""))
        self.reply, self.timed_out = reply, False
        self.timer = qt.QTimer(self.runner.parent)
        self.timer.setSingleShot(True)
        self.timer.setInterval(int(1000 * request.read_timeout_s))  # connect failures come from Qt itself
        self.timer.timeout.connect(self._on_timeout)
        self.timer.start()
        self.job.abort = reply.abort
        reply.finished.connect(lambda: self._on_finished(reply, request, attempt))

    def _on_timeout(self) -> None:
        if self.reply is not None:
            self.timed_out = True
            self.reply.abort()

    def _on_finished(self, reply, request: HttpRequest, attempt: int) -> None:
        self.timer.stop()
        self.timer.deleteLater()
        self.reply = None
        self.job.abort = None
        status = reply.attribute(qt.QNetworkRequest.HttpStatusCodeAttribute)
        value: Any = None
        error: Optional[BaseException] = None
        try:
            if status is not None and not self.timed_out:
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
