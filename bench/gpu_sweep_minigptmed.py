"""A 150-slice MiniGPT-Med sweep at real size on a GPU: one slice at a time vs batched, dynamic vs static decode.

Random weights of the real architecture are written in the original file formats (as bench/minigptmed_engine.py
does), loaded through the engine, and 150 synthetic 512x512 CT-like slices go through ``engine.analyze_batch`` with the
detect task (the engine work of a sweep; the HTTP and MRML parts are measured on CPU in bench/sweep.py). Random weights
rarely emit EOS, so every slice generates the full ``--new-tokens``: a worst case.

    PYTHONPATH=. python3 bench/gpu_sweep_minigptmed.py [--slices 150] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "Testing"))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def slices(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) / 220.0) ** 2 + ((xx - 256) / 240.0) ** 2 < 1
    out = []
    for k in range(n):
        img = np.where(body, 110.0, 0.0)
        cy, cx, r = 200 + (k % 7) * 10, 300 - (k % 5) * 12, 12 + (k % 4) * 3
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 180.0
        img += rng.normal(0, 6, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=150)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="the tiny config on the CPU (a dry run of this script)")
    args = ap.parse_args()
    from minigptmed_engine import LLAMA_TINY, VISION_TINY, bench_model, write_original
    from MiniGPTMedSlicerLib.protocol import DETECT

    from backend.engines.base import AnalysisInput, DecodedImage, StopToken
    from backend.engines.minigptmed import MiniGPTMedEngine
    from backend.settings import MiniGPTMedSettings

    device, dtype, cfg, llama = bench_model(args.tiny)
    res: dict = {
        "gpu": "cpu (tiny)" if args.tiny else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "slices": args.slices,
        "new_tokens": args.new_tokens,
    }
    imgs = slices(args.slices)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = write_original(Path(tmp) / "orig", cfg, llama, device)
        model_config = None
        if args.tiny:
            model_config = Path(tmp) / "model_config.json"
            model_config.write_text(json.dumps({"vision": VISION_TINY, "llm_hidden_size": LLAMA_TINY["hidden_size"]}))
        res["write_s"] = round(time.perf_counter() - t0, 1)
        from minigpt_fixtures import _train_tokenizer  # a small SentencePiece model, trained offline

        _train_tokenizer(Path(files["llama"]))
        for static in (False, True):
            engine = MiniGPTMedEngine(
                MiniGPTMedSettings(
                    eva=str(files["eva"]),
                    llama=str(files["llama"]),
                    checkpoint=str(files["checkpoint"]),
                    model_config=str(model_config) if model_config else None,
                    device=device,
                    dtype=str(dtype).replace("torch.", ""),
                    max_batch=8,
                    cache_size=0,
                    static_decode=static,
                )
            )
            t0 = time.perf_counter()
            engine.load()
            load_s = time.perf_counter() - t0
            # random weights emit ids beyond the small test tokenizer's vocabulary: fold them in for decoding
            n_pieces = engine.tokenizer.sp.get_piece_size()
            decode = engine.tokenizer.decode
            engine.tokenizer.decode = lambda ids, _d=decode, _n=n_pieces: _d([int(i) % _n for i in ids])
            inputs = [
                AnalysisInput(
                    task=DETECT.id, image=DecodedImage(im, "PNG"), modality="CT", max_new_tokens=args.new_tokens
                )
                for im in imgs
            ]
            engine.analyze_batch(inputs[:8], StopToken())  # warm-up
            for batch in (1, 8):
                _sync()
                t0 = time.perf_counter()
                for i in range(0, len(inputs), batch):
                    engine.analyze_batch(inputs[i : i + batch], StopToken())
                _sync()
                dt = time.perf_counter() - t0
                key = f"{'static' if static else 'dynamic'}_batch{batch}"
                res[key] = {
                    "seconds": round(dt, 2),
                    "slices_per_s": round(len(inputs) / dt, 2),
                    "load_s": round(load_s, 1),
                }
                print(key, res[key], flush=True)
            del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
