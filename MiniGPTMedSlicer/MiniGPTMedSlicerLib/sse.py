"""Server-sent events (``text/event-stream``), written and read without any transport.

The backend writes a streamed ``/v1/analyze`` with :func:`.protocol.format_event`; the client reads it with :class:`SseParser`
fed from whatever moves the bytes (``requests``' ``iter_content`` in the runner, Qt's ``readyRead`` in the panel) and
:func:`analyze_event` turns each event into a delta text, the final :class:`~.protocol.AnalyzeResponse`, or the
:class:`~.client.BackendError` an ``error`` event means. Stdlib only (runs in Slicer's Python).

Framing as the HTML standard's event-stream parser: lines end with LF, CRLF or CR; ``event:`` names the event,
``data:`` lines are joined with LF, ``:`` lines are comments, a blank line dispatches; one optional space after the
colon is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, List, Optional


@dataclass
class Event:
    event: str  # "message" when the stream named none
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class SseParser:
    """Incremental parser: :meth:`feed` bytes as they arrive (split anywhere, even inside a UTF-8 character), get
    the complete events so far."""

    def __init__(self) -> None:
        self._buf = b""
        self._event = ""
        self._data: List[str] = []

    def feed(self, chunk: bytes) -> List[Event]:
        self._buf += chunk
        out: List[Event] = []
        while True:
            line, rest = self._next_line(self._buf)
            if line is None:
                return out
            self._buf = rest
            ev = self._line(line.decode("utf-8", errors="replace"))
            if ev is not None:
                out.append(ev)

    def close(self) -> List[Event]:
        """End of stream: an event not closed by a blank line is dropped, as the standard says."""
        self._buf, self._event, self._data = b"", "", []
        return []

    @staticmethod
    def _next_line(buf: bytes):
        for i, b in enumerate(buf):
            if b == 0x0A:
                return buf[:i], buf[i + 1 :]
            if b == 0x0D:
                if i + 1 == len(buf):
                    return None, buf  # CR at the end: maybe CRLF, wait for the next byte
                return buf[:i], buf[i + 2 :] if buf[i + 1] == 0x0A else buf[i + 1 :]
        return None, buf

    def _line(self, line: str) -> Optional[Event]:
        if line == "":
            if not self._data and not self._event:
                return None
            ev = Event(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return ev
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None
