"""Decoding on prompt embeddings for the LLaVA family.

LLaVA-Rad (``llava/eval/model_mimic_cxr.py``): ``do_sample = temperature > 0`` (``scripts/eval.sh`` passes
``--temperature 0``: greedy), ``top_p=None``, ``num_beams=1``, ``max_new_tokens=256``, ``use_cache=True``; no
stopping criteria besides EOS. BiMediX2 (``BiMed-MBench/bimedix_inference.py``): ``top_p`` 1.0, up to 1024 new
tokens, stopped at ``<|eot_id|>`` or the generation config's EOS ids; its ``generate`` call leaves ``top_k`` to
transformers' default, 50 (Llama 3.1's generation config sets none). Ours: greedy unless a request sets a
temperature, a cancel check and the streaming callback per step."""

from __future__ import annotations

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
    top_k: int | None = None,
) -> Generated:
    """``embeds``: [L, H] prompt embeddings. Returns the new ids without the stop token; ``on_step`` gets the ids
    generated so far after each step."""
    from backend.embeds_generate import generate_on_embeds

    stops = [eos_id] if isinstance(eos_id, int) else [int(i) for i in eos_id]
    d = generate_on_embeds(
        llm,
        embeds,
        max_new_tokens,
        stops,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        should_stop=should_stop,
        on_step=on_step,
    )
    ids, why = d.ids, d.why
    cut = next((k for k, i in enumerate(ids) if i in stops), None)
    if cut is not None:
        ids, why = ids[:cut], "eos"
    return Generated(ids=ids, stopped=why, prompt_tokens=int(embeds.shape[0]), seconds=d.seconds)
