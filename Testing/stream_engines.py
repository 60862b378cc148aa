"""A decoding stand-in for streaming and cancel tests over the real server: it implements the real Engine interface
and decodes like a language model (one token per step, ``step_s`` per step, streaming each step through the real
``DeltaText``, checking the stop token and each row's cancel flag between steps), so the tests can ask for many
tokens, a multi-byte answer split inside its characters, or a failure after some tokens. The real MiniGPT-Med decode
loop is tested the same way on the tiny model (Testing/backend/minigpt/test_minigpt_conversation.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from backend.engines.base import AnalysisInput, AnalysisResult, Engine, EngineError, EngineInfo, StopToken
from backend.engines.text_stream import DeltaText


class TokenEngine(Engine):
    """The answer to a request is its ``prompt`` (default: ``"tok0 tok1 ..."``, ``max_new_tokens`` of them, 50 by
    default), decoded one UTF-8 BYTE per step when the prompt starts with ``bytes:`` (so multi-byte characters are
    split across steps), else one word per step. A prompt ``fail:N`` fails after N tokens."""

    def __init__(self, step_s: float = 0.01):
        self.step_s = step_s
        self.lock = threading.Lock()
        self.calls: list[int] = []  # rows per call
        self.steps = 0
        self.cancel_seen: list[float] = []  # when a row's cancel flag was first seen set
        self.starts: list[float] = []  # when each call started

    def load(self) -> None:
        pass

    def info(self) -> EngineInfo:
        return EngineInfo(engine="tokens", model="token-stand-in", device="cpu", tasks=("report", "vqa"), max_batch=4)

    @staticmethod
    def _pieces(inp: AnalysisInput) -> tuple[list[bytes], int | None]:
        p = inp.prompt or ""
        if p.startswith("fail:"):
            n = int(p[5:])
            return [f"tok{i} ".encode() for i in range(n + 5)], n
        if p.startswith("bytes:"):
            return [bytes([b]) for b in p[6:].encode()], None
        if p:
            return [w.encode() for w in p.split(" ")], None
        return [f"tok{i} ".encode() for i in range(inp.max_new_tokens or 50)], None

    def analyze_batch(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        with self.lock:
            self.calls.append(len(inputs))
            self.starts.append(time.monotonic())
        rows = [self._pieces(inp) for inp in inputs]
        done: list[bytes] = [b"" for _ in inputs]
        streams = [DeltaText(inp.on_text) if inp.on_text is not None else None for inp in inputs]
        cancelled = [False] * len(inputs)
        step = 0
        longest = max(len(r[0]) for r in rows)
        while step < longest:
            stop.check()
            for i, inp in enumerate(inputs):
                if inp.is_cancelled() and not cancelled[i]:
                    cancelled[i] = True
                    self.cancel_seen.append(time.monotonic())
            if all(cancelled):
                break
            for i, (pieces, fail_at) in enumerate(rows):
                if cancelled[i] or step >= len(pieces):
                    continue
                if fail_at is not None and step == fail_at:
                    raise EngineError(f"stand-in failure after {fail_at} tokens")
                done[i] += pieces[step]
                s = streams[i]
                if s is not None:
                    s.update(done[i].decode("utf-8", errors="replace"))
            step += 1
            self.steps += 1
            time.sleep(self.step_s)
        out = []
        for i, _inp in enumerate(inputs):
            if cancelled[i]:
                out.append(AnalysisResult(text="", cancelled=True))
                continue
            text = done[i].decode("utf-8", errors="replace")
            s = streams[i]
            if s is not None:
                s.finish(text)
            out.append(AnalysisResult(text=text, raw_output=text))
        return out
