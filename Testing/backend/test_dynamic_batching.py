"""Dynamic batching in the engine worker: requests that wait together share one engine call, rows go back to the
right requests, a sweep does not starve a single Analyze. Real servers on loopback ports; the timing test uses an
engine whose cost per call is fixed (so the ratio does not depend on the machine's load), the answer test the tiny
MiniGPT-Med."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest
import requests
from conftest import b64, blob_image
from fault_engines import FixedCostEngine
from MiniGPTMedSlicerLib.png import encode_png

from backend.batching import Pending, plan_call
from backend.server_thread import ServerThread
from backend.settings import ServerSettings

PNG = b64(encode_png(blob_image(size=64, blobs=((30, 30, 5, 60),))))


def _vqa(q: str) -> dict:
    return {"task": "vqa", "image": PNG, "question": q}


def _concurrently(url: str, bodies: list[dict], path: str = "/v1/analyze") -> tuple[list[requests.Response], float]:
    """Send all bodies at the same moment (a barrier); returns the responses and the wall time until the last."""
    barrier = threading.Barrier(len(bodies))

    def go(body):
        barrier.wait()
        t0 = time.perf_counter()
        r = requests.post(f"{url}{path}", json=body, timeout=60)
        return r, t0, time.perf_counter()

    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        out = list(pool.map(go, bodies))
    return [r for r, _, _ in out], max(e for _, _, e in out) - min(s for _, s, _ in out)


def test_plan_takes_single_requests_first_then_batches_in_order_up_to_the_cap():
    sweep, other_sweep = Pending("sweep", 20), Pending("other", 3)
    a, b = Pending("a", 1), Pending("b", 1)
    sweep.next_row = 8  # its first 8 rows were served
    call = plan_call([sweep, a, other_sweep, b], cap=8)
    assert [(p.job, i) for p, i in call] == [("a", 0), ("b", 0)] + [("sweep", i) for i in range(8, 14)]
    assert [(p.job, i) for p, i in plan_call([other_sweep], cap=8)] == [("other", 0), ("other", 1), ("other", 2)]


def test_eight_concurrent_requests_take_less_than_twice_one():
    eng = FixedCostEngine(delay_s=0.4)
    with ServerThread(eng, ServerSettings(batch_window_s=0.2)) as url:
        assert requests.post(f"{url}/v1/analyze", json=_vqa("warm"), timeout=30).status_code == 200
        t0 = time.perf_counter()
        one = requests.post(f"{url}/v1/analyze", json=_vqa("single"), timeout=30)
        t_one = time.perf_counter() - t0
        assert one.json()["text"] == "vqa:single"
        n_calls = len(eng.calls)
        rs, t_eight = _concurrently(url, [_vqa(f"q{i}") for i in range(8)])
    assert [r.json()["text"] for r in rs] == [f"vqa:q{i}" for i in range(8)]  # each request got its own row
    calls = eng.calls[n_calls:]
    print(f"one request {t_one:.3f} s, eight concurrent {t_eight:.3f} s ({t_eight / t_one:.2f}x), calls {calls}")
    assert t_eight < 2 * t_one
    assert len(calls) < 8 and max(len(c) for c in calls) > 1


@pytest.fixture(scope="module")
def tiny_engine():
    from minigpt_fixtures import tiny_files

    from backend.engines.minigptmed import MiniGPTMedEngine
    from backend.settings import MiniGPTMedSettings

    tiny = tiny_files()
    return MiniGPTMedEngine(
        MiniGPTMedSettings(
            eva=str(tiny.eva),
            llama=str(tiny.llama),
            checkpoint=str(tiny.checkpoint),
            model_config=str(tiny.model_config),
        )
    )


def test_minigptmed_answers_batched_dynamically_equal_one_at_a_time(tiny_engine):
    from minigpt_fixtures import _training_images

    imgs = [b64(encode_png(a)) for a in _training_images()]
    bodies = [
        {"task": "detect", "question": "tumor", "modality": "CT", "image": imgs[0]},
        {"task": "report", "image": imgs[1]},
        {"task": "vqa", "question": "is there a mass?", "image": imgs[2]},
        {"task": "ground", "question": "nodule", "image": imgs[3]},
        {"task": "detect", "modality": "CR", "image": imgs[1]},
        {"task": "identify", "region": [10, 10, 40, 30], "image": imgs[0]},
        {"task": "vqa", "question": "is there a mass?", "image": imgs[0], "max_new_tokens": 3},
        {"task": "report", "image": imgs[3]},
    ]
    st = ServerThread(tiny_engine, ServerSettings(batch_window_s=0.3))
    with st as url:
        service = st.app.state.service
        alone = []
        for body in bodies:
            r = requests.post(f"{url}/v1/analyze", json=body, timeout=60)
            assert r.status_code == 200, r.text
            alone.append(r.json())
        n_calls = len(service.calls)
        rs, _ = _concurrently(url, bodies)
        calls = service.calls[n_calls:]
    together = [r.json() for r in rs]
    keys = ("text", "findings", "raw_output", "warnings")
    assert [{k: d[k] for k in keys} for d in together] == [{k: d[k] for k in keys} for d in alone]
    assert max(calls) > 1  # they did share engine calls
    assert alone[0]["findings"] and alone[0]["text"] != alone[1]["text"]  # the answers differ between requests


def test_a_sweep_does_not_starve_a_single_analyze():
    eng = FixedCostEngine(delay_s=0.3, max_batch=8)
    with ServerThread(eng, ServerSettings(batch_window_s=0.0)) as url, cf.ThreadPoolExecutor(2) as pool:
        sweep_body = {"items": [_vqa(f"s{i}") for i in range(24)]}
        sweep = pool.submit(
            lambda: (requests.post(f"{url}/v1/analyze/batch", json=sweep_body, timeout=60), time.perf_counter())
        )
        t_end = time.monotonic() + 20
        while not eng.calls and time.monotonic() < t_end:  # the sweep's first call is running
            time.sleep(0.01)
        single = requests.post(f"{url}/v1/analyze", json=_vqa("click"), timeout=60)
        t_single = time.perf_counter()
        r_sweep, t_sweep = sweep.result()
    assert single.status_code == 200 and single.json()["text"] == "vqa:click"
    assert [x["text"] for x in r_sweep.json()["results"]] == [f"vqa:s{i}" for i in range(24)]
    assert eng.calls[0] == [f"s{i}" for i in range(8)]
    assert eng.calls[1] == ["click"] + [f"s{i}" for i in range(8, 15)]  # served between the sweep's calls
    assert [q for c in eng.calls for q in c if q != "click"] == [f"s{i}" for i in range(24)]
    assert t_single < t_sweep  # it waited for the call in flight, not for the whole sweep
