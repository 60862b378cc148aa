"""MiniGPT-Med's LLM on a CPU-only machine: batch-1 decode of the real-size LLaMA-2-7B in bf16 (and bitsandbytes
4-bit where it runs on the CPU) against the CPU's measured memory bandwidth.

    PYTHONPATH=. python bench/cpu_decode.py --quick               # tiny config, seconds (checks the script)
    PYTHONPATH=. python bench/cpu_decode.py --out cpu.json        # real size: ~16 GB of disk, ~14 GB of RAM

Random weights are written in the ORIGINAL layout (a Llama-2-7b-chat-hf folder with fp16 safetensors shards and
the MiniGPT-Med checkpoint with its LoRA; ``bench/minigptmed_engine.py``'s writer) and loaded the way the engine
loads them (strict, LoRA merged), in bf16. The vision tower is not loaded (it would add 2 GB and is not the
decode bottleneck); the bf16 prompt is the real layout: 8 text + 256 image + 20 text embeddings (the 4-bit run, and the
bf16 run with ``--short-prompt``, use 4 text embeddings, and the real prompt's prefill time is extrapolated from the
measured bf16 matmul rate: 2 FLOP per weight per token).

Bound: at batch 1 every decode step reads every LLM weight once (the embedding table is looked up, not streamed),
so tok/s <= bandwidth / weight bytes. Bandwidth = a numpy copy of a 1 GiB array, counted as bytes read + written.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from minigptmed_engine import LLAMA_7B, LLAMA_TINY, VISION_TINY, write_original

from backend.minigpt.config import MiniGPTMedConfig
from backend.minigpt.generate import generate
from backend.minigpt.model import merge_lora
from backend.minigpt.weights import LoadOptions, _load_llm, attach_lora, load_checkpoint


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def copy_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Best of ``reps`` numpy copies of ``nbytes``: GB/s counting the bytes read plus the bytes written."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def load_llm(files: dict, cfg: MiniGPTMedConfig, quantize: str = "none"):
    opts = LoadOptions(device="cpu", dtype=torch.bfloat16, quantize=quantize)
    t0 = time.perf_counter()
    llm = _load_llm(files["llama"], opts)
    c = llm.config
    parts = load_checkpoint(files["checkpoint"], cfg, c.num_hidden_layers, c.hidden_size)
    attach_lora(llm, cfg, parts.lora, torch.float32 if quantize != "none" else torch.bfloat16)
    if quantize == "none":
        merge_lora(llm)
    return llm, time.perf_counter() - t0


def streamed_bytes(llm) -> int:
    """Bytes of the weights one decode step reads (all parameters but the embedding table)."""
    emb = llm.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in llm.parameters() if p is not emb)


@torch.inference_mode()
def decode(llm, new_tokens: int, image_tokens: int = 256, text: tuple[int, int] = (8, 20)) -> dict:
    """Greedy decode after a prompt of ``text[0]`` token embeddings (starting with the double BOS), ``image_tokens``
    image-like embeddings and ``text[1]`` token embeddings (8 + 256 + 20 = MiniGPT-Med's real layout)."""
    h = llm.config.hidden_size
    g = torch.Generator().manual_seed(0)
    emb = llm.get_input_embeddings()
    ids_a = torch.randint(3, llm.config.vocab_size, (text[0],), generator=g)
    ids_a[:2] = 1  # the double BOS
    ids_b = torch.randint(3, llm.config.vocab_size, (text[1],), generator=g)
    img = (torch.randn(image_tokens, h, generator=g) * 0.02).to(emb.weight.dtype)
    prompt = torch.cat([emb(ids_a), img, emb(ids_b)])
    generate(llm, [prompt[:2]], 2, eos_id=-1, bos_id=1)  # warm-up
    out = generate(llm, [prompt], new_tokens, eos_id=-1, bos_id=1)
    steps = max(out.steps - 1, 1)
    return {
        "prompt_tokens": out.prompt_lengths[0],
        "new_tokens": new_tokens,
        "prefill_s": round(out.prefill_s, 2),
        "decode_s": round(out.decode_s, 2),
        "s_per_token": round(out.decode_s / steps, 3),
        "tok_s": round(steps / out.decode_s, 3),
    }


def matmul_rate(dtype: torch.dtype, rows: int = 284) -> float:
    """GFLOP/s of one LLaMA-7B MLP matmul (rows x 4096 @ 4096 x 11008) in ``dtype``: what a prefill of ``rows``
    tokens runs at."""
    a, w = torch.randn(rows, 4096).to(dtype), torch.randn(11008, 4096).to(dtype)
    torch.nn.functional.linear(a, w)
    t0 = time.perf_counter()
    torch.nn.functional.linear(a, w)
    return 2 * rows * 4096 * 11008 / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny config (checks the script in seconds)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-bnb", action="store_true", help="skip the bitsandbytes 4-bit run")
    ap.add_argument(
        "--short-prompt",
        action="store_true",
        help="a 4-token prompt instead of MiniGPT-Med's 284 (8 + 256 image + 20): for CPUs where the real prefill would "
        "take far too long (its time is then extrapolated from the measured matmul rate)",
    )
    ap.add_argument("--dir", default=None, help="where to write the random original files (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    res: dict = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": a.quick,
    }
    bw = copy_bandwidth((256 if a.quick else 1024) << 20)
    res["copy_GBps"] = round(bw, 2)
    log(f"numpy copy bandwidth: {bw:.1f} GB/s (read + write)")
    if a.quick:
        cfg = MiniGPTMedConfig.from_dict({"vision": VISION_TINY, "llm_hidden_size": LLAMA_TINY["hidden_size"]})
        llama = LLAMA_TINY
    else:
        cfg, llama = MiniGPTMedConfig.real(), LLAMA_7B
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="cpu-decode-") as d:
        t0 = time.perf_counter()
        files = write_original(Path(d), cfg, llama, "cpu")
        res["write_original_s"] = round(time.perf_counter() - t0, 1)
        log(f"wrote random original files in {res['write_original_s']} s")
        llm, load_s = load_llm(files, cfg)
        nbytes = streamed_bytes(llm)
        prompt = {"image_tokens": 0, "text": (2, 2)} if a.short_prompt else {}
        res["bf16"] = {
            "load_s": round(load_s, 1),
            "weight_GB": round(nbytes / 1e9, 2),
            **decode(llm, a.new_tokens, **prompt),  # type: ignore[arg-type]
        }
        rate = matmul_rate(torch.bfloat16)
        res["bf16"]["matmul_GFLOPs"] = round(rate, 2)
        res["bf16"]["real_prompt_prefill_s_extrapolated"] = round(2 * nbytes / 2 * 284 / (rate * 1e9), 1)
        res["bf16"]["bound_tok_s"] = round(bw * 1e9 / nbytes, 3)
        res["bf16"]["ratio_to_bound"] = round(res["bf16"]["tok_s"] / res["bf16"]["bound_tok_s"], 3)
        log(f"bf16: {res['bf16']}")
        del llm
        gc.collect()
        if not a.no_bnb:
            try:
                qllm, qload_s = load_llm(files, cfg, quantize="4bit")
                qbytes = streamed_bytes(qllm)
                res["bnb_4bit"] = {
                    "load_s": round(qload_s, 1),
                    "weight_GB": round(qbytes / 1e9, 2),
                    **decode(qllm, max(4, a.new_tokens // 2), image_tokens=0, text=(2, 2)),
                }
                res["bnb_4bit"]["bound_tok_s"] = round(bw * 1e9 / qbytes, 3)
                res["bnb_4bit"]["ratio_to_bound"] = round(res["bnb_4bit"]["tok_s"] / res["bnb_4bit"]["bound_tok_s"], 3)
                del qllm
            except Exception as e:  # report why it does not run on this CPU
                res["bnb_4bit"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            log(f"bnb 4-bit: {res['bnb_4bit']}")
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
