"""Engines that misbehave on purpose, served by the real server, for reliability tests.

They implement the real Engine interface; only their analysis is fake (the real thing cannot be made to be
slow, run out of GPU memory or emit garbage on demand)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from MiniGPTMedSlicerLib.protocol import Finding

from backend.engines.base import AnalysisInput, AnalysisResult, Engine, EngineInfo, StopToken


class SlowEngine(Engine):
    """Sleeps ``float(prompt)`` seconds (default ``delay_s``) per batch, checking the stop token like a decoder would."""

    def __init__(self, delay_s: float = 1.0):
        self.delay_s = delay_s
        self.started = 0
        self.finished = 0
        self.stopped = 0
        self.lock = threading.Lock()

    def load(self) -> None:
        pass

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="slow", model="slow-test-engine", device="cpu", tasks=("report", "detect"), max_batch=8
        )

    def analyze_batch(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        with self.lock:
            self.started += 1
        delay = float(inputs[0].prompt) if inputs[0].prompt else self.delay_s
        t_end = time.monotonic() + delay
        try:
            while time.monotonic() < t_end:
                stop.check()
                time.sleep(0.01)
        except Exception:
            with self.lock:
                self.stopped += 1
            raise
        with self.lock:
            self.finished += 1
        return [AnalysisResult(text=f"slept {delay:.2f}s", raw_output="ok") for _ in inputs]


class OutOfMemoryError(RuntimeError):
    """Same class name as torch.cuda.OutOfMemoryError."""


class OOMOnceEngine(SlowEngine):
    def __init__(self):
        super().__init__(0.0)
        self.failed = False

    def analyze_batch(self, inputs, stop):
        if not self.failed:
            self.failed = True
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().analyze_batch(inputs, stop)


class GarbageEngine(SlowEngine):
    """Returns what a confused model might: NaN, inverted and outside boxes, thousands of boxes, absurd labels."""

    def __init__(self):
        super().__init__(0.0)

    def analyze_batch(self, inputs, stop):
        out = []
        for inp in inputs:
            w, h = inp.image.width, inp.image.height
            findings = [
                Finding("nan", [float("nan"), 0, 10, 10]),
                Finding("inverted", [50, 60, 10, 20], 0.5),
                Finding("outside", [w + 10, h + 10, w + 50, h + 50]),
                Finding("partly outside", [-20, -20, 30, 30], float("inf")),
                Finding("\x00\x1b[31mred\x07 label\r\n", [1, 1, 5, 5], 0.9),
                Finding("x" * 10_000, [2, 2, 6, 6]),
                Finding("short box", [1, 2, 3]),  # type: ignore[list-item]
                Finding("strings", ["a", "b", "c", "d"]),  # type: ignore[list-item]
            ] + [Finding(f"many {i}", [i % w, i % h, i % w + 1, i % h + 1]) for i in range(5000)]
            out.append(AnalysisResult(text="t\x00ext " + "y" * 50_000, findings=findings, raw_output="\x1b[2J"))
        return out


class FixedCostEngine(Engine):
    """Costs ``delay_s`` per call whatever the number of rows (as a GPU decode step at small batch sizes), so that
    dynamic batching shows as a time ratio that does not depend on the machine's load. Answers from the input only
    (``task:question``); ``calls`` records each call's questions, in order."""

    def __init__(self, delay_s: float = 0.4, max_batch: int = 8):
        self.delay_s = delay_s
        self.max_batch = max_batch
        self.calls: list[list[str | None]] = []
        self.lock = threading.Lock()

    def load(self) -> None:
        pass

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="fixed-cost",
            model="fixed-cost-test-engine",
            device="cpu",
            tasks=("report", "vqa", "detect"),
            max_batch=self.max_batch,
        )

    def analyze_batch(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        with self.lock:
            self.calls.append([inp.question for inp in inputs])
        t_end = time.monotonic() + self.delay_s
        while time.monotonic() < t_end:
            stop.check()
            time.sleep(0.005)
        return [AnalysisResult(text=f"{inp.task}:{inp.question}", raw_output="ok") for inp in inputs]


class LongAnswerEngine(SlowEngine):
    """Answers every task (``vqa`` included) at once with a long text of ``chars`` characters and no boxes (the
    default: the server's limit, backend.findings.MAX_TEXT_CHARS), for timing the client's handling of long answers."""

    def __init__(self, chars: int = 20_000):
        super().__init__(0.0)
        self.chars = chars

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="long", model="long-answer-test-engine", device="cpu", tasks=("report", "vqa", "detect"), max_batch=8
        )

    def analyze_batch(self, inputs, stop):
        sentence = "The answer goes on at length about what the slice shows, sentence after sentence. "
        text = (sentence * (self.chars // len(sentence) + 1))[: self.chars]
        return [AnalysisResult(text=text, raw_output=text) for _ in inputs]


class TwoBoxEngine(SlowEngine):
    """A stand-in detector for endpoint tests: two boxes at fixed fractions of the image, whatever it shows."""

    def __init__(self):
        super().__init__(0.0)

    def analyze_batch(self, inputs, stop):
        out = []
        for inp in inputs:
            w, h = inp.image.width, inp.image.height
            boxes = [[0.1 * w, 0.2 * h, 0.3 * w, 0.45 * h], [0.55 * w, 0.5 * h, 0.8 * w, 0.9 * h]]
            out.append(AnalysisResult(text="two boxes", findings=[Finding(f"box {i}", b) for i, b in enumerate(boxes)]))
        return out
