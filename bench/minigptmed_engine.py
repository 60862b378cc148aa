"""Benchmark of the MiniGPT-Med engine (backend.minigpt) on random weights written in the ORIGINAL file formats.

    PYTHONPATH=. python bench/minigptmed_engine.py --quick          # tiny config on the CPU, < 1 minute
    PYTHONPATH=. python bench/minigptmed_engine.py --out result.json  # real-size architecture on a GPU

Real size = EVA ViT-g/14 (39 blocks used, a 40th in the file, 16x16 pos_embed) + LLaMA-2-7B dims + LoRA r=64 +
llama_proj 5632->4096, random weights written to a temp dir as eva_vit_g.pth, a Llama-2-7b-chat-hf folder
(sharded safetensors, fp16) and a MiniGPT-Med checkpoint .pth (no downloads). Measured: load time of the original
files and of the converted folder, conversion time, time to first token for one 448 px image, prefill and decode
tokens/s at batch 1 and 8 (ours vs Hugging Face ``generate`` on the same weights), and the memory-bandwidth bound
(LLM weight bytes / HBM bandwidth) as the ceiling of batch-1 decode.

Imports only torch, transformers, safetensors and backend.minigpt (the GPU machine has no fastapi).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.minigpt.config import MiniGPTMedConfig
from backend.minigpt.convert import convert
from backend.minigpt.generate import generate
from backend.minigpt.preprocess import preprocess
from backend.minigpt.static_decode import StaticDecoder
from backend.minigpt.weights import LoadOptions, load_converted, load_original

LLAMA_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
LLAMA_TINY = dict(
    LLAMA_7B,
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
VISION_TINY = {"image_size": 448, "patch_size": 14, "width": 64, "depth": 2, "heads": 4, "mlp_dim": 128}
HBM_SPEC_TBPS = {"H100 PCIe": 2.0, "H100 NVL": 3.9, "H100": 3.35, "H200": 4.8, "A100": 2.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- writing random weights in the original formats --------------------------------------------------------------


def _rand(shape, dtype, device, gen, std=0.02):
    return (torch.randn(shape, device=device, generator=gen, dtype=torch.float32) * std).to(dtype)


def write_original(root: Path, cfg: MiniGPTMedConfig, llama: dict, device: str, shard_bytes: int = 2 << 30) -> dict:
    """eva_vit_g.pth + Llama folder + checkpoint .pth with the original key names; returns the paths."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    gen = torch.Generator(device=device).manual_seed(0)
    v = cfg.vision
    root.mkdir(parents=True, exist_ok=True)
    # EVA: Conv/Linear fp16, LayerNorms / cls / pos / q,v biases fp32; one block more than used; 224-px pos_embed
    eva = {
        "cls_token": _rand((1, 1, v.width), torch.float32, device, gen),
        "pos_embed": _rand((1, 257, v.width), torch.float32, device, gen),
        "patch_embed.proj.weight": _rand((v.width, 3, v.patch_size, v.patch_size), torch.float16, device, gen),
        "patch_embed.proj.bias": torch.zeros(v.width, dtype=torch.float16),
    }
    for i in range(v.depth + 1):
        b = f"blocks.{i}."
        eva.update(
            {
                b + "norm1.weight": torch.ones(v.width),
                b + "norm1.bias": torch.zeros(v.width),
                b + "attn.q_bias": torch.zeros(v.width),
                b + "attn.v_bias": torch.zeros(v.width),
                b + "attn.qkv.weight": _rand((3 * v.width, v.width), torch.float16, device, gen),
                b + "attn.proj.weight": _rand((v.width, v.width), torch.float16, device, gen),
                b + "attn.proj.bias": torch.zeros(v.width, dtype=torch.float16),
                b + "norm2.weight": torch.ones(v.width),
                b + "norm2.bias": torch.zeros(v.width),
                b + "mlp.fc1.weight": _rand((v.mlp_dim, v.width), torch.float16, device, gen),
                b + "mlp.fc1.bias": torch.zeros(v.mlp_dim, dtype=torch.float16),
                b + "mlp.fc2.weight": _rand((v.width, v.mlp_dim), torch.float16, device, gen),
                b + "mlp.fc2.bias": torch.zeros(v.width, dtype=torch.float16),
            }
        )
    torch.save({k: t.cpu() for k, t in eva.items()}, root / "eva_vit_g.pth")
    del eva
    # LLaMA folder: config.json (fp16), generation_config.json asking for sampling, sharded safetensors
    folder = root / "Llama-2-7b-chat-hf"
    folder.mkdir(exist_ok=True)
    lcfg = LlamaConfig(**llama)
    lcfg.save_pretrained(str(folder))
    cj = json.loads((folder / "config.json").read_text())
    cj["torch_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(cj, indent=2))
    GenerationConfig(
        bos_token_id=1, eos_token_id=2, do_sample=True, temperature=0.6, top_p=0.9, max_length=4096, pad_token_id=0
    ).save_pretrained(str(folder))
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in LlamaForCausalLM(lcfg).state_dict().items()}
    shard, size, n, index = {}, 0, 0, {}

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for k, shp in shapes.items():
        t = torch.ones(shp, dtype=torch.float16) if "norm" in k else _rand(shp, torch.float16, device, gen).cpu()
        shard[k] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    # MiniGPT-Med checkpoint: {'model': llama_proj + LoRA (no .default) + inv_freq, 'optimizer': ...}
    h, r = llama["hidden_size"], cfg.lora.r
    hd = h // llama["num_attention_heads"]
    model = {
        "llama_proj.weight": _rand((h, cfg.proj_in), torch.float32, device, gen).cpu(),
        "llama_proj.bias": torch.zeros(h),
    }
    pre = "llama_model.base_model.model.model.layers."
    for i in range(llama["num_hidden_layers"]):
        for m in ("q_proj", "v_proj"):
            model[f"{pre}{i}.self_attn.{m}.lora_A.weight"] = _rand((r, h), torch.float32, device, gen).cpu()
            model[f"{pre}{i}.self_attn.{m}.lora_B.weight"] = _rand((h, r), torch.float32, device, gen).cpu()
        model[f"{pre}{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}, "epoch": 5}, root / "minigptmed.pth")
    return {"eva": root / "eva_vit_g.pth", "llama": folder, "checkpoint": root / "minigptmed.pth", "llm_bytes": total}


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# ---- measurements --------------------------------------------------------------------------------------------------


def prompt_embeds(model, image_emb: torch.Tensor, seg0: int = 8, seg1: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = model.llm.config.vocab_size
    a = torch.randint(3, vocab, (seg0,), generator=g)
    b = torch.randint(3, vocab, (seg1,), generator=g)
    a[:2] = 1  # the double BOS
    return torch.cat(
        [model.embed_tokens(a), image_emb.to(model.llm.get_input_embeddings().weight.dtype), model.embed_tokens(b)]
    )


def images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (512, 512), dtype=np.uint8) for _ in range(n)]


@torch.inference_mode()
def time_to_first_token(model, size: int, reps: int = 3, decode=None) -> dict:
    """Preprocess + vision + prefill + first token for one image, best of ``reps`` after one warm-up; ``decode``:
    a ``generate``-like callable (default: the dynamic-cache loop on ``model.llm``)."""
    if decode is None:

        def decode(prompts, n, **kw):
            return generate(model.llm, prompts, n, **kw)

    img = images(1)[0]
    out = []
    for _ in range(reps + 1):
        sync()
        t0 = time.perf_counter()
        px = preprocess(img, size)[None]
        t1 = time.perf_counter()
        emb = model.encode_images(px)[0]
        sync()
        t2 = time.perf_counter()
        g = decode([prompt_embeds(model, emb)], 1, eos_id=-1, bos_id=1)
        t3 = time.perf_counter()
        out.append(
            {
                "preprocess_ms": (t1 - t0) * 1e3,
                "vision_ms": (t2 - t1) * 1e3,
                "prefill_ms": g.prefill_s * 1e3,
                "ttft_ms": (t3 - t0) * 1e3,
                "prompt_tokens": g.prompt_lengths[0],
            }
        )
    best = min(out[1:], key=lambda d: d["ttft_ms"])
    return {k: round(v, 2) for k, v in best.items()}


@torch.inference_mode()
def decode_rates(model, batch: int, new_tokens: int) -> dict:
    embs = model.encode_images(torch.stack([preprocess(im, model.cfg.vision.image_size) for im in images(batch)]))
    prompts = [prompt_embeds(model, embs[i], seed=i) for i in range(batch)]
    generate(model.llm, prompts, 4, eos_id=-1, bos_id=1)  # warm-up
    g = generate(model.llm, prompts, new_tokens, eos_id=-1, bos_id=1)
    steps = max(g.steps - 1, 1)
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "prefill_ms": round(g.prefill_s * 1e3, 2),
        "prefill_tok_s": round(sum(g.prompt_lengths) / g.prefill_s, 1),
        "decode_tok_s": round(batch * steps / g.decode_s, 1),
        "ms_per_step": round(g.decode_s / steps * 1e3, 3),
    }


@torch.inference_mode()
def hf_generate_rates(model, batch: int, new_tokens: int) -> dict:
    """transformers ``generate`` on the same LLM and the same left-padded embeddings (greedy)."""
    embs = model.encode_images(torch.stack([preprocess(im, model.cfg.vision.image_size) for im in images(batch)]))
    prompts = [prompt_embeds(model, embs[i], seed=i) for i in range(batch)]
    L = max(p.shape[0] for p in prompts)
    x = torch.zeros(batch, L, prompts[0].shape[-1], dtype=prompts[0].dtype, device=prompts[0].device)
    mask = torch.zeros(batch, L, dtype=torch.long, device=x.device)
    for i, p in enumerate(prompts):
        x[i, L - p.shape[0] :] = p
        mask[i, L - p.shape[0] :] = 1

    def run(n):
        sync()
        t0 = time.perf_counter()
        model.llm.generate(
            inputs_embeds=x,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            num_beams=1,
            eos_token_id=None,
            pad_token_id=0,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        sync()
        return time.perf_counter() - t0

    run(4)
    t1, tn = run(1), run(new_tokens)
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "first_token_ms": round(t1 * 1e3, 2),
        "decode_tok_s": round(batch * (new_tokens - 1) / (tn - t1), 1),
        "ms_per_step": round((tn - t1) / (new_tokens - 1) * 1e3, 3),
    }


@torch.inference_mode()
def static_rates(model, batch: int, new_tokens: int, graphs: bool = True) -> dict:
    """The fast decode path (``backend.minigpt.static_decode``): our static KV cache, one CUDA graph per batch bucket
    (on CUDA; ``graphs=False`` runs the same steps eagerly)."""
    embs = model.encode_images(torch.stack([preprocess(im, model.cfg.vision.image_size) for im in images(batch)]))
    prompts = [prompt_embeds(model, embs[i], seed=i) for i in range(batch)]
    dec = StaticDecoder(model.llm, batch, max(p.shape[0] for p in prompts) + new_tokens + 8, graphs=graphs)
    t0 = time.perf_counter()
    dec.capture()
    dec.generate(prompts, 8, eos_id=-1, bos_id=1)  # warm-up
    sync()
    warm = time.perf_counter() - t0
    g = dec.generate(prompts, new_tokens, eos_id=-1, bos_id=1)
    ref = generate(model.llm, prompts, new_tokens, eos_id=-1, bos_id=1)
    steps = max(g.steps - 1, 1)
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "cuda_graphs": dec.use_graphs,
        "capture_s": round(dec.capture_s, 2),
        "warmup_s": round(warm, 2),
        "prefill_ms": round(g.prefill_s * 1e3, 2),
        "decode_tok_s": round(batch * steps / g.decode_s, 1),
        "ms_per_step": round(g.decode_s / steps * 1e3, 3),
        "same_tokens_as_dynamic_cache_path": g.tokens == ref.tokens,
        "first_diff_step": next(
            (
                min(i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b)
                for x, y in zip(g.tokens, ref.tokens, strict=True)
                if x != y
            ),
            None,
        ),
    }


def one_by_one_vs_batched(model, n: int, new_tokens: int) -> dict:
    embs = model.encode_images(torch.stack([preprocess(im, model.cfg.vision.image_size) for im in images(n)]))
    prompts = [prompt_embeds(model, embs[i], seed=i) for i in range(n)]
    with torch.inference_mode():
        generate(model.llm, prompts[:1], 2, eos_id=-1, bos_id=1)
        sync()
        t0 = time.perf_counter()
        single = [generate(model.llm, [p], new_tokens, eos_id=-1, bos_id=1).tokens[0] for p in prompts]
        sync()
        t1 = time.perf_counter()
        batched = generate(model.llm, prompts, new_tokens, eos_id=-1, bos_id=1).tokens
        sync()
        t2 = time.perf_counter()
    return {
        "items": n,
        "new_tokens": new_tokens,
        "one_by_one_s": round(t1 - t0, 3),
        "batched_s": round(t2 - t1, 3),
        "speedup": round((t1 - t0) / (t2 - t1), 2),
        "same_tokens": single == batched,
    }


@torch.inference_mode()
def batch_invariance_probe(model, n: int = 8, new_tokens: int = 32) -> dict:
    """Why batched and one-by-one greedy can differ in fp16: compare the last-position logits of the prefill run
    alone and inside a left-padded batch, and look at the top-1/top-2 margins along a greedy decode."""
    from transformers import DynamicCache

    embs = model.encode_images(torch.stack([preprocess(im, model.cfg.vision.image_size) for im in images(n)]))
    prompts = [prompt_embeds(model, embs[i], seed=i, seg1=20 + 3 * i) for i in range(n)]
    L = max(p.shape[0] for p in prompts)
    x = torch.zeros(n, L, prompts[0].shape[-1], dtype=prompts[0].dtype, device=prompts[0].device)
    mask = torch.zeros(n, L, dtype=torch.long, device=x.device)
    for i, p in enumerate(prompts):
        x[i, L - p.shape[0] :] = p
        mask[i, L - p.shape[0] :] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    batched = (
        model.llm(
            inputs_embeds=x,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=DynamicCache(config=model.llm.config),
            logits_to_keep=1,
        )
        .logits[:, -1]
        .float()
    )
    diffs = []
    for i, p in enumerate(prompts):
        one = model.llm(inputs_embeds=p[None], logits_to_keep=1).logits[0, -1].float()
        diffs.append((one - batched[i]).abs().max().item())
    margins = []
    for p in prompts[:2]:
        cache = DynamicCache(config=model.llm.config)
        lg = model.llm(inputs_embeds=p[None], past_key_values=cache, logits_to_keep=1).logits[0, -1].float()
        for _ in range(new_tokens):
            top = torch.topk(lg, 2).values
            margins.append((top[0] - top[1]).item())
            nxt = lg.argmax()[None, None]
            lg = model.llm(input_ids=nxt, past_key_values=cache).logits[0, -1].float()
    margins.sort()
    return {
        "prefill_logit_max_abs_diff_batched_vs_single": round(max(diffs), 5),
        "greedy_top2_margin_min": round(margins[0], 5),
        "greedy_top2_margin_median": round(margins[len(margins) // 2], 5),
        "steps_with_margin_below_max_diff": sum(m < max(diffs) for m in margins),
        "steps": len(margins),
    }


def hbm_bandwidth() -> dict:
    name = torch.cuda.get_device_name()
    spec = next((v for k, v in HBM_SPEC_TBPS.items() if k in name), None)
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    measured = 10 * 2 * x.numel() / (time.perf_counter() - t0) / 1e12
    del x, y
    torch.cuda.empty_cache()
    return {"device": name, "spec_TBps": spec, "measured_copy_TBps": round(measured, 3)}


def llm_weight_bytes(llm) -> int:
    """Bytes read per decode step: every LLM weight except the embedding table (a gather of B rows)."""
    emb = llm.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in llm.parameters() if p is not emb)


# ---- main ----------------------------------------------------------------------------------------------------------


def bench_model(quick: bool) -> tuple[str, torch.dtype, MiniGPTMedConfig, dict]:
    """(device, dtype, MiniGPT-Med config, LLaMA config): the tiny model in fp32 on the CPU, or the real-size
    architecture in fp16 on CUDA."""
    if quick:
        cfg = MiniGPTMedConfig.from_dict({"vision": VISION_TINY, "llm_hidden_size": LLAMA_TINY["hidden_size"]})
        return "cpu", torch.float32, cfg, LLAMA_TINY
    return "cuda", torch.float16, MiniGPTMedConfig.real(), LLAMA_7B


def run(quick: bool, workdir: Path, new_tokens: int, skip: set[str] = frozenset()) -> dict:
    device, dtype, cfg, llama = bench_model(quick)
    res: dict = {
        "mode": "quick (tiny config, CPU)" if quick else "real-size architecture, random weights",
        "torch": torch.__version__,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
    }
    if not quick:
        res["gpu"] = torch.cuda.get_device_name()
    import transformers

    res["transformers"] = transformers.__version__
    t0 = time.perf_counter()
    files = write_original(workdir / "orig", cfg, llama, "cuda" if not quick else "cpu")
    res["write_original_files_s"] = round(time.perf_counter() - t0, 1)
    res["file_sizes_GB"] = {
        k: round(
            sum(f.stat().st_size for f in (Path(files[k]).rglob("*") if Path(files[k]).is_dir() else [Path(files[k])]))
            / 1e9,
            3,
        )
        for k in ("eva", "llama", "checkpoint")
    }
    log(f"wrote original files in {res['write_original_files_s']} s: {res['file_sizes_GB']}")
    opts = LoadOptions(device=device, dtype=dtype)
    res["page_cache_dropped"] = (not quick) and drop_page_cache()
    t0 = time.perf_counter()
    model, rep = load_original(files["eva"], files["llama"], files["checkpoint"], cfg, opts)
    sync()
    res["load_original_s"] = round(time.perf_counter() - t0, 2)
    res["loaded_tensors"] = rep.loaded
    log(f"loaded original files in {res['load_original_s']} s ({rep.loaded})")
    res["llm_weight_GB"] = round(llm_weight_bytes(model.llm) / 1e9, 3)
    if not quick:
        res["gpu_mem_after_load_GB"] = round(torch.cuda.memory_allocated() / 1e9, 2)
    # time to first token, decode at batch 1 and 8, HF generate baseline
    res["ttft_one_image"] = time_to_first_token(model, cfg.vision.image_size)
    log(f"TTFT {res['ttft_one_image']}")
    res["ours"] = [decode_rates(model, b, new_tokens) for b in (1, 8)]
    log(f"ours {res['ours']}")
    res["hf_generate"] = [hf_generate_rates(model, b, new_tokens) for b in (1, 8)]
    log(f"HF generate {res['hf_generate']}")
    res["ours_again"] = [decode_rates(model, b, new_tokens) for b in (1, 8)]  # order effects
    res["hf_generate_again"] = [hf_generate_rates(model, b, new_tokens) for b in (1, 8)]
    log(f"ours again {res['ours_again']}; HF again {res['hf_generate_again']}")
    res["batch_invariance"] = batch_invariance_probe(model)
    log(f"batch invariance {res['batch_invariance']}")
    res["static_decode"] = []
    for b in () if "static" in skip else (1, 8):
        try:
            res["static_decode"].append(static_rates(model, b, new_tokens))
        except Exception as e:  # record why the fast path failed and go on
            res["static_decode"].append({"batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        log(f"static decode {res['static_decode'][-1]}")
    res["batched_vs_one_by_one"] = one_by_one_vs_batched(model, 8, min(new_tokens, 32))
    log(f"batched vs one by one {res['batched_vs_one_by_one']}")
    if not quick:
        res["peak_gpu_mem_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        bw = hbm_bandwidth()
        res["hbm"] = bw
        wb = llm_weight_bytes(model.llm)
        for key in ("spec_TBps", "measured_copy_TBps"):
            if bw.get(key):
                res[f"batch1_ceiling_tok_s_{key.split('_')[0]}"] = round(bw[key] * 1e12 / wb, 1)
    del model
    if not quick:
        torch.cuda.empty_cache()
    if "convert" in skip:
        return res
    # convert + load converted
    t0 = time.perf_counter()
    convert(str(files["eva"]), str(files["llama"]), str(files["checkpoint"]), workdir / "converted", cfg)
    res["convert_s"] = round(time.perf_counter() - t0, 1)
    log(f"converted in {res['convert_s']} s")
    res["page_cache_dropped_before_converted"] = (not quick) and drop_page_cache()
    t0 = time.perf_counter()
    model2, _, _rep2 = load_converted(workdir / "converted", opts)
    sync()
    res["load_converted_s"] = round(time.perf_counter() - t0, 2)
    log(f"loaded converted folder in {res['load_converted_s']} s")
    res["ours_converted_batch1"] = decode_rates(model2, 1, min(new_tokens, 64))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny config on the CPU (< 1 minute)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode length (default 32 quick, 128 GPU)")
    p.add_argument("--workdir", default=None, help="where the random weight files go (default: a temp dir, removed)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--skip", default="", help="comma list of sections to skip: static, convert")
    a = p.parse_args(argv)
    if not a.quick and not torch.cuda.is_available():
        raise SystemExit("the real-size benchmark needs a CUDA GPU; use --quick on the CPU")
    if a.quick:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="minigptmed-bench-"))
    t0 = time.perf_counter()
    try:
        res = run(a.quick, work, a.new_tokens or (32 if a.quick else 128), set(filter(None, a.skip.split(","))))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
