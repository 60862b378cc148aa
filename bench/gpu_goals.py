"""Issue 18 section 1 in one call: MiniGPT-Med at real size against the GPU goals, each figure with its bound, side by
side with Hugging Face ``generate`` on the same weights.

    PYTHONPATH=.:MiniGPTMedSlicer:$DEPS python3 bench/gpu_goals.py --out $OUT/goals.json   # the GPU (about 5 min)
    PYTHONPATH=.:MiniGPTMedSlicer python bench/gpu_goals.py --quick                        # tiny config, CPU dry run

1. Bound: the measured device-to-device copy rate; batch-1 decode cannot beat LLM weight bytes per step / that rate.
2. Random weights of the real architecture in the original layout (``bench/minigptmed_engine.write_original``) and a
   32000-piece SentencePiece model trained here (so the server decodes every id), ``convert``ed to the folder that the
   server loads.
3. In process, the converted folder loaded again: decode tokens/s at batch 1 and 8 (ours: static cache + CUDA graphs;
   HF ``generate`` with its dynamic cache on the same embeddings); time to first token for one 448 px image
   (preprocess + EVA + prefill + first token).
4. Then the server as a subprocess (``minigptmed-backend serve --engine minigptmed --converted DIR --static-decode``), page
   cache dropped first: *ready* = process start to the first ``/health`` answer (it loads, captures the CUDA graphs and
   warms up before it listens). Over HTTP on loopback: ``detect`` on one 512x512 slice with ``max_new_tokens`` 20 (the
   size of a detect answer; random weights never emit EOS, so every answer is 20 tokens): the first request and the
   median of the next ones; a sweep of 133 slices through ``/v1/analyze/batch`` (three requests sent at once, the
   worker batches up to 8 rows, each row ends at its own limit).

The server rows need fastapi, uvicorn and fastapi-offline, which the GPU image lacks: ``--deps DIR`` names a folder of
wheels for its Python (``pip download`` them here; docs/benchmarks.md has the command), installed with ``--no-deps``
into a temp dir first. Without them the server rows say why they are missing and the rest still runs.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "MiniGPTMedSlicer", ROOT / "bench", ROOT / "Testing"):
    sys.path.insert(0, str(p))

from gpu_sweep_minigptmed import slices  # noqa: E402
from minigptmed_engine import (  # noqa: E402
    bench_model,
    drop_page_cache,
    hbm_bandwidth,
    hf_generate_rates,
    llm_weight_bytes,
    static_rates,
    time_to_first_token,
    write_original,
)
from MiniGPTMedSlicerLib.png import encode_png  # noqa: E402

GOALS = {  # issue 18 section 1
    "batch1_share_of_bound": 0.80,
    "batch8_over_batch1": 6.0,
    "ttft_ms": 40.0,
    "detect_ms": 150.0,
    "ready_s": 30.0,
    "sweep_s": 3.0,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def install_server_deps(wheels: str | None, into: Path) -> str | None:
    """fastapi & co. for the server subprocess: None when importable (here) or installed from ``wheels``; else why not."""
    probe = "import fastapi, uvicorn, fastapi_offline"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
        return None
    if not wheels:
        return "fastapi, uvicorn and fastapi-offline are not installed here and no --deps folder was given"
    names = [w.name for w in Path(wheels).glob("*.whl")]
    have = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json"], capture_output=True, text=True).stdout
    installed = {d["name"].lower().replace("-", "_") for d in json.loads(have or "[]")}
    todo = [str(Path(wheels) / n) for n in names if n.split("-")[0].lower() not in installed]
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(into), *todo],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return f"pip install of the carried wheels failed: {r.stderr.strip().splitlines()[-1:]}"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(into)]))
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode != 0:
        return "the carried wheels do not import"
    return None


def server_rows(conv: Path, device: str, quick: bool, sweep_n: int, detect_tokens: int, reps: int) -> dict:
    import requests
    from backend_process import BackendProcess

    out: dict = {"page_cache_dropped": (not quick) and drop_page_cache()}
    args = ["--engine", "minigptmed", "--converted", str(conv), "--static-decode", "--device", device]
    args += ["--dtype", "float32" if quick else "float16", "--log-level", "info"]  # max_batch 8: the default
    proc = BackendProcess(*args)
    t0 = time.perf_counter()
    url = proc.start(timeout_s=240)  # well inside one device call
    out["ready_s"] = round(time.perf_counter() - t0, 2)
    try:
        text = proc.log()
        out["log"] = [ln for ln in text.splitlines() if "loaded" in ln or "ready" in ln or "graph" in ln][-6:]
        s = requests.Session()
        imgs = slices(max(sweep_n, reps + 1))
        body = {"task": "detect", "modality": "CT", "max_new_tokens": detect_tokens}
        times, engine_ms = [], []
        for i in range(reps + 1):
            b = {**body, "image": base64.b64encode(encode_png(imgs[i])).decode()}
            t = time.perf_counter()
            r = s.post(f"{url}/v1/analyze", json=b, timeout=120)
            times.append((time.perf_counter() - t) * 1e3)
            r.raise_for_status()
            engine_ms.append(r.json()["timings_ms"])
        later = sorted(times[1:])
        out["detect"] = {
            "new_tokens": detect_tokens,
            "first_ms": round(times[0], 1),
            "median_ms": round(statistics.median(later), 1),
            "p90_ms": round(later[int(0.9 * (len(later) - 1))], 1),
            "first_over_median": round(times[0] / statistics.median(later), 2),
            "server_timings_ms_last": engine_ms[-1],
        }
        log(f"detect over HTTP {out['detect']}")
        payload = [base64.b64encode(encode_png(im)).decode() for im in imgs[:sweep_n]]
        parts = [payload[i::3] for i in range(3)]
        done: list = [None] * 3

        def send(k: int) -> None:
            items = [{**body, "image": p} for p in parts[k]]
            done[k] = requests.post(f"{url}/v1/analyze/batch", json={"items": items}, timeout=600)

        # warm once at the sweep's shapes (a user's earlier request would have), then the timed sweep
        requests.post(f"{url}/v1/analyze/batch", json={"items": [{**body, "image": p} for p in payload[:8]]})
        t = time.perf_counter()
        threads = [threading.Thread(target=send, args=(k,)) for k in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        ok = all(r is not None and r.status_code == 200 for r in done)
        n = sum(len(r.json()["results"]) for r in done if r is not None and r.status_code == 200)
        out["sweep"] = {"slices": n, "seconds": round(wall, 2), "slices_per_s": round(n / wall, 1), "ok": ok}
        log(f"sweep over HTTP {out['sweep']}")
    finally:
        proc.stop()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny config on the CPU (a dry run of every step)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--deps", default=None, help="a folder of wheels for the server (fastapi, uvicorn, ...)")
    ap.add_argument("--workdir", default=None, help="where the weight files go (default: a temp dir, removed)")
    ap.add_argument("--new-tokens", type=int, default=128, help="decode length for the tok/s rows")
    ap.add_argument("--sweep-slices", type=int, default=133)
    ap.add_argument("--detect-tokens", type=int, default=20)
    ap.add_argument("--skip", default="", help="comma list: server, decode")
    a = ap.parse_args(argv)
    quick = a.quick
    if not quick and not torch.cuda.is_available():
        raise SystemExit("gpu_goals: needs a CUDA GPU; --quick runs the tiny config on the CPU")
    skip = set(filter(None, a.skip.split(",")))
    here = [str(ROOT), str(ROOT / "MiniGPTMedSlicer")]  # for the server subprocess, wherever this was started from
    os.environ["PYTHONPATH"] = os.pathsep.join([*here, *filter(None, [os.environ.get("PYTHONPATH")])])
    from minigpt_fixtures import _train_tokenizer

    from backend.minigpt.convert import convert
    from backend.minigpt.static_decode import StaticDecoder
    from backend.minigpt.weights import LoadOptions, load_converted

    device, dtype, cfg, llama = bench_model(quick)
    import transformers

    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "mode": "quick (tiny config, CPU)" if quick else "real-size architecture, random weights, fp16",
        "device": torch.cuda.get_device_name() if not quick else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "goals": GOALS,
    }
    if not quick:
        res["hbm"] = hbm_bandwidth()
        log(f"bandwidth {res['hbm']}")
    save(res, a.out)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="gpu-goals-"))
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        files = write_original(work / "orig", cfg, llama, device)
        _train_tokenizer(Path(files["llama"]), vocab_size=llama["vocab_size"])
        res["write_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        conv = work / "converted"
        convert(str(files["eva"]), str(files["llama"]), str(files["checkpoint"]), conv, cfg)
        res["convert_s"] = round(time.perf_counter() - t0, 1)
        shutil.rmtree(work / "orig", ignore_errors=True)
        log(f"wrote {res['write_s']} s, converted {res['convert_s']} s")
        save(res, a.out)
        if "decode" not in skip:
            t0 = time.perf_counter()
            model, _, _ = load_converted(conv, LoadOptions(device=device, dtype=dtype))
            sync()
            res["load_converted_in_process_s"] = round(time.perf_counter() - t0, 2)
            wb = llm_weight_bytes(model.llm)
            res["llm_weight_GB"] = round(wb / 1e9, 3)
            if not quick:
                res["bound_tok_s"] = round(res["hbm"]["measured_copy_TBps"] * 1e12 / wb, 1)
            res["ours_static"] = [static_rates(model, b, a.new_tokens) for b in (1, 8)]
            log(f"ours (static cache + graphs) {res['ours_static']}")
            save(res, a.out)
            res["hf_generate"] = [hf_generate_rates(model, b, a.new_tokens) for b in (1, 8)]
            log(f"HF generate {res['hf_generate']}")
            save(res, a.out)
            dec = StaticDecoder(model.llm, 1, 1024)
            dec.capture()
            res["ttft_one_image"] = time_to_first_token(model, cfg.vision.image_size, reps=5, decode=dec.generate)
            log(f"TTFT {res['ttft_one_image']}")
            if not quick:
                res["peak_gpu_mem_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            del model, dec
            if not quick:
                torch.cuda.empty_cache()
        if "server" not in skip:
            why = install_server_deps(a.deps, work / "deps")
            if why:
                res["server"] = {"missing": why}
            else:
                try:
                    res["server"] = server_rows(conv, device, quick, a.sweep_slices, a.detect_tokens, 20)
                except Exception as e:  # record it: the decode rows are already saved
                    res["server"] = {"error": f"{type(e).__name__}: {str(e)[-800:]}"}
            log(f"server {res['server']}")
            save(res, a.out)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    save(res, a.out)
    print(json.dumps(res, indent=2))
    return 0


def save(res: dict, out: str | None) -> None:
    """The results so far, with their summary (after every step: a call cut short still brings back what it had)."""
    res["summary"] = summary(res)
    if out:
        tmp = Path(out).with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(out)


def summary(res: dict) -> list[dict]:
    """One row per goal: measured, target, ratio (measured / bound or target), met."""
    rows = []
    st = {r["batch"]: r for r in res.get("ours_static", []) if "decode_tok_s" in r}
    hf = {r["batch"]: r for r in res.get("hf_generate", [])}
    bound = res.get("bound_tok_s")
    if 1 in st and bound:
        v = st[1]["decode_tok_s"]
        rows.append(
            {
                "goal": "batch-1 decode",
                "measured": v,
                "bound": bound,
                "ratio": round(v / bound, 3),
                "hf_generate": hf.get(1, {}).get("decode_tok_s"),
                "met": v / bound >= GOALS["batch1_share_of_bound"],
            }
        )
    if 1 in st and 8 in st:
        r = st[8]["decode_tok_s"] / st[1]["decode_tok_s"]
        rows.append({"goal": "batch 8 / batch 1", "measured": round(r, 2), "met": r >= GOALS["batch8_over_batch1"]})
    if "ttft_one_image" in res:
        v = res["ttft_one_image"]["ttft_ms"]
        rows.append({"goal": "TTFT ms", "measured": v, "target": GOALS["ttft_ms"], "met": v <= GOALS["ttft_ms"]})
    srv = res.get("server", {})
    if "detect" in srv:
        v = srv["detect"]["median_ms"]
        rows.append(
            {
                "goal": "detect ms (HTTP)",
                "measured": v,
                "first": srv["detect"]["first_ms"],
                "target": GOALS["detect_ms"],
                "met": v <= GOALS["detect_ms"] and srv["detect"]["first_ms"] <= GOALS["detect_ms"],
            }
        )
    if "ready_s" in srv:
        v = srv["ready_s"]
        rows.append({"goal": "ready s", "measured": v, "target": GOALS["ready_s"], "met": v <= GOALS["ready_s"]})
    if "sweep" in srv:
        v = srv["sweep"]["seconds"]
        rows.append({"goal": "sweep s", "measured": v, "target": GOALS["sweep_s"], "met": v <= GOALS["sweep_s"]})
    return rows


if __name__ == "__main__":
    sys.exit(main())
