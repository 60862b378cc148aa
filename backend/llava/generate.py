"""Decoding on prompt embeddings for the LLaVA family.

LLaVA-Rad (``llava/eval/model_mimic_cxr.py``): ``do_sample = temperature > 0`` (``scripts/eval.sh`` passes
``--temperature 0``: greedy), ``top_p=None``, ``num_beams=1``, ``max_new_tokens=256``, ``use_cache=True``; no
stopping criteria besides EOS. BiMediX2 (``BiMed-MBench/bimedix_inference.py``): ``top_p`` 1.0, up to 1024 new
tokens, stopped at ``<|eot_id|>`` or the generation config's EOS ids. Ours: greedy unless a request sets a
temperature, a cancel check and the streaming callback per step."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

EVAL_MAX_NEW_TOKENS = 256


@dataclass
class Generated:
    ids: list[int]
    stopped: str  # "eos", "length", "cancelled"
    prompt_tokens: int
    seconds: float


def generate(
    llm,
    embeds: torch.Tensor,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    temperature: float = 0.0,
    should_stop=None,
    seed: int | None = None,
    on_step: Callable[[list[int]], None] | None = None,
    top_p: float | None = None,
) -> Generated:
    """``embeds``: [L, H] prompt embeddings. Returns the new ids without the stop token; ``on_step`` gets the ids
    generated so far after each step."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    state = {"why": "length"}
    stops = [eos_id] if isinstance(eos_id, int) else [int(i) for i in eos_id]

    class _Cancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if on_step is not None:
                on_step([int(i) for i in input_ids[0].tolist()])
            if should_stop is not None and should_stop():
                state["why"] = "cancelled"
                return True
            return False

    kw: dict = {
        "max_new_tokens": max_new_tokens,
        "num_beams": 1,
        "use_cache": True,
        "stopping_criteria": StoppingCriteriaList([_Cancel()]),
        "eos_token_id": stops,
        "pad_token_id": stops[0],
    }
    if temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=top_p, top_k=None)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    t0 = time.perf_counter()
    n = int(embeds.shape[0])
    mask = torch.ones(1, n, dtype=torch.long, device=embeds.device)
    out = llm.generate(inputs_embeds=embeds[None], attention_mask=mask, **kw)
    ids = [int(i) for i in out[0].tolist()]
    why = state["why"]
    cut = next((k for k, i in enumerate(ids) if i in stops), None)
    if cut is not None:
        ids, why = ids[:cut], "eos"
    return Generated(ids=ids, stopped=why, prompt_tokens=n, seconds=time.perf_counter() - t0)
