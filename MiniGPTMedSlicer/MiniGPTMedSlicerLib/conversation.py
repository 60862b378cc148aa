"""A conversation about one image, kept by the client (the server is stateless apart from its image store).

:meth:`Conversation.ask` is a sequence of calls (see :mod:`.client`: it runs over ``requests`` with ``run_calls``
and over Qt with the panel's runner): it uploads the image once (``POST /v1/images``), sends each question with its
``image_id`` and the earlier turns as ``history``, and uploads again by itself when the server answers that the id is
unknown (404) or was evicted (410). Turns are saved as JSON (``to_json``/``from_json``) in the analysis' text node.
Pure stdlib (Slicer's Python).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from . import protocol
from .client import BackendClient, BackendError, Calls, run_calls
from .protocol import REUPLOAD_CODES, AnalyzeRequest, AnalyzeResponse, HistoryTurn, SliceValues


@dataclass
class ConversationTurn:
    task: str
    question: str
    answer: str  # the model's text as it wrote it (raw_output): what the next turn sends back as history
    text: str  # the answer as shown
    findings: int = 0  # boxes returned in this turn (they become markups under the analysis)


@dataclass
class Conversation:
    image: str  # base64 PNG, as sent
    values: Optional[SliceValues] = None
    image_id: Optional[str] = None
    turns: List[ConversationTurn] = field(default_factory=list)
    uploads: int = 0  # how many times the image was uploaded (1, or more after an eviction)
    last_response: Optional[AnalyzeResponse] = None

    def digest(self) -> str:
        """A hash of the image and values as sent (no patient data): whether an image captured again is the one a
        saved ``image_id`` names (the server's id hashes the decoded pixels, which the client does not decode)."""
        import hashlib

        h = hashlib.sha256(self.image.encode())
        if self.values is not None:
            h.update(json.dumps(dataclasses.asdict(self.values), sort_keys=True).encode())
        return h.hexdigest()

    def history(self) -> List[HistoryTurn]:
        return [HistoryTurn(question=t.question, answer=t.answer, task=t.task) for t in self.turns]

    def request_for(self, request: AnalyzeRequest) -> AnalyzeRequest:
        """``request`` (built for the image) as a follow-up: the stored image's id and the earlier turns."""
        return dataclasses.replace(
            request, image=None, values=None, image_id=self.image_id, history=self.history() or None
        )

    def ask(self, client: BackendClient, request: AnalyzeRequest, stream: bool = False) -> Calls:
        """Calls: upload if needed, then the question (``stream``: answered as server-sent events, which a transport
        may show as they come); the answer is added as a turn and returned."""
        call = client.stream_request if stream else client.analyze_request
        if self.image_id is None:
            yield from self._upload(client)
        try:
            response = yield call(self.request_for(request))
        except BackendError as e:
            if e.code not in REUPLOAD_CODES:
                raise
            yield from self._upload(client)
            response = yield call(self.request_for(request))
        self.add(request, response)
        self.last_response = response
        return response

    def stream(self, client: BackendClient, request: AnalyzeRequest) -> Iterator[str]:
        """The blocking transport's streamed :meth:`ask`: yields text deltas; then ``last_response`` holds the answer
        (re-uploads on 404/410 before the first delta, as :meth:`ask`)."""
        if self.image_id is None:
            run_calls(self._upload(client), client)
        for attempt in (0, 1):
            s = client.stream(self.request_for(request))
            try:
                yield from s
            except BackendError as e:
                if attempt or e.code not in REUPLOAD_CODES:
                    raise
                run_calls(self._upload(client), client)
                continue
            assert s.response is not None
            self.last_response = s.response
            self.add(request, s.response)
            return

    def _upload(self, client: BackendClient) -> Calls:
        stored = yield client.upload_request(self.image, self.values)
        self.image_id = stored.image_id
        self.uploads += 1

    def add(self, request: AnalyzeRequest, response: AnalyzeResponse) -> None:
        question = request.question or request.prompt or ""
        self.turns.append(
            ConversationTurn(
                task=request.task,
                question=question,
                answer=response.raw_output or response.text,
                text=response.text,
                findings=len(response.findings),
            )
        )

    # -- saved with the analysis ---------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps([dataclasses.asdict(t) for t in self.turns])

    @staticmethod
    def turns_from_json(text: str) -> List[ConversationTurn]:
        data: Any = json.loads(text) if text else []
        if not isinstance(data, list):
            raise protocol.ProtocolError("conversation", "expected a list of turns")
        out = []
        for i, d in enumerate(data):
            if not isinstance(d, dict):
                raise protocol.ProtocolError(f"conversation[{i}]", "expected an object")
            known: Dict[str, Any] = {f.name: d[f.name] for f in dataclasses.fields(ConversationTurn) if f.name in d}
            out.append(ConversationTurn(**known))
        return out

    def transcript(self) -> str:
        """The conversation as text, for the panel's conversation area."""
        return "\n\n".join(f"Q: {t.question or t.task}\nA: {t.text}" for t in self.turns)
