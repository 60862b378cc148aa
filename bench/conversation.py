"""Conversation and streaming latencies over the real server (uvicorn on loopback) with the tiny offline MiniGPT-Med:
time to first delta of a streamed report, follow-up latency with and without the image-embedding cache, and
Cancel-to-idle (DELETE /v1/requests/{id} after the first delta -> the engine worker idle); then the openai engine
relaying the stream of a remote server (the stand-in of Testing/backend/engines/openai_standin.py, vLLM's chunked SSE on
loopback): time to first delta through both servers, and Cancel-to-idle while the remote server is silent (the engine
closes the connection without waiting for its next chunk) with the time until the remote server sees the disconnect.

    PYTHONPATH=.:MiniGPTMedSlicer:Testing python bench/conversation.py [--reps 5]
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1] / p) for p in ("", "MiniGPTMedSlicer", "Testing", "Testing/backend/engines")
]

import requests  # noqa: E402
from minigpt_fixtures import _training_images, tiny_files  # noqa: E402
from MiniGPTMedSlicerLib import protocol  # noqa: E402
from MiniGPTMedSlicerLib.client import AnalyzeStream, BackendClient  # noqa: E402
from MiniGPTMedSlicerLib.png import encode_png  # noqa: E402
from openai_standin import OpenAIStandIn  # noqa: E402

from backend.engines.minigptmed import MiniGPTMedEngine  # noqa: E402
from backend.engines.openai_engine import OpenAIEngine  # noqa: E402
from backend.server_thread import ServerThread  # noqa: E402
from backend.settings import MiniGPTMedSettings, OpenAISettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    t = tiny_files()
    e = MiniGPTMedEngine(
        MiniGPTMedSettings(
            eva=str(t.eva), llama=str(t.llama), checkpoint=str(t.checkpoint), model_config=str(t.model_config)
        )
    )
    st = ServerThread(e)
    url = st.start()
    service = st.app.state.service
    img = base64.b64encode(encode_png(_training_images()[0])).decode()
    client = BackendClient(url)
    client.analyze(protocol.AnalyzeRequest(task="report", image=img))  # warm-up
    ttfd, total, warm, cold, idle, decoded = [], [], [], [], [], []
    for _ in range(a.reps):
        e._cache.clear()
        t0 = time.perf_counter()
        first, _s, it = _first_delta(client, protocol.AnalyzeRequest(task="report", image=img))
        ttfd.append(first)
        list(it)
        total.append(time.perf_counter() - t0)
        stored = client.upload(img)
        first = client.analyze(
            protocol.AnalyzeRequest(task="vqa", question="is there a mass?", image_id=stored.image_id)
        )
        hist = [protocol.HistoryTurn(question="is there a mass?", answer=first.raw_output, task="vqa")]
        follow = protocol.AnalyzeRequest(task="report", image_id=stored.image_id, history=hist)
        t0 = time.perf_counter()
        client.analyze(follow)
        warm.append(time.perf_counter() - t0)
        e._cache.clear()
        t0 = time.perf_counter()
        client.analyze(follow)
        cold.append(time.perf_counter() - t0)
        # Cancel-to-idle: a long sampled answer, cancelled after its first delta
        long = protocol.AnalyzeRequest(task="report", image=img, temperature=1.5, max_new_tokens=1000)
        _first, s, it = _first_delta(client, long)
        _t0, to_idle = _cancel_to_idle(url, service, s.request_id)
        idle.append(to_idle)
        try:
            decoded.append(len(list(it)))
        except Exception:
            decoded.append(-1)
    st.stop()

    def ms(v):
        return f"median {statistics.median(v) * 1000:.1f} ms (min {min(v) * 1000:.1f}, max {max(v) * 1000:.1f})"

    print(f"reps {a.reps}")
    print(f"time to first delta (streamed report, cold cache): {ms(ttfd)}; whole answer {ms(total)}")
    print(f"follow-up (report after one vqa turn, image_id) with the image cache: {ms(warm)}")
    print(f"follow-up without the image cache (vision encoder runs): {ms(cold)}")
    print(f"Cancel-to-idle (DELETE after the first delta -> engine idle): {ms(idle)}")
    r_ttfd, r_idle, r_seen = _openai_relay(img, a.reps)
    print(f"openai engine relay: time to first delta {ms(r_ttfd)}")
    print(f"openai engine relay, remote silent: Cancel-to-idle {ms(r_idle)}; remote sees the disconnect {ms(r_seen)}")


def _first_delta(client: BackendClient, request: protocol.AnalyzeRequest) -> tuple[float, AnalyzeStream, Iterator[Any]]:
    """Send ``request`` streamed and read its first delta: (the seconds until it came, the stream, its other deltas)."""
    t0 = time.perf_counter()
    s = client.stream(request)
    it = iter(s)
    next(it)
    return time.perf_counter() - t0, s, it


def _cancel_to_idle(url: str, service: Any, request_id: str | None) -> tuple[float, float]:
    """Cancel the request (DELETE /v1/requests/{id}) and wait until the engine is idle: (time.perf_counter() when the
    DELETE was sent, the seconds from then until idle)."""
    t0 = time.perf_counter()
    requests.delete(f"{url}/v1/requests/{request_id}", timeout=5)
    while service.engine_busy:
        time.sleep(0.0005)
    return t0, time.perf_counter() - t0


def _openai_relay(img: str, reps: int) -> tuple[list[float], list[float], list[float]]:
    ttfd, idle, seen = [], [], []
    with OpenAIStandIn() as standin:
        st = ServerThread(OpenAIEngine(OpenAISettings(url=standin.url)))
        url, service = st.start(), st.app.state.service
        client = BackendClient(url)
        client.analyze(protocol.AnalyzeRequest(task="report", image=img))  # warm-up
        for _ in range(reps):
            standin.script(["The lungs", " are clear."])
            first, _s, it = _first_delta(client, protocol.AnalyzeRequest(task="report", image=img))
            ttfd.append(first)
            list(it)
            standin.script([" tok", " more"], hold_after=1)  # the remote server goes silent after one piece
            _first, s, it = _first_delta(client, protocol.AnalyzeRequest(task="report", image=img))
            t0, to_idle = _cancel_to_idle(url, service, s.request_id)
            idle.append(to_idle)
            standin.disconnected.wait(10)
            seen.append(standin.disconnected_t - t0)
            try:
                list(it)
            except Exception:
                pass
        st.stop()
    return ttfd, idle, seen


if __name__ == "__main__":
    main()
