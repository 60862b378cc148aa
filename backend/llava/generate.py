"""LLaVA-Rad's decoding (``llava/eval/model_mimic_cxr.py``): ``do_sample = temperature > 0`` (``scripts/eval.sh``
passes ``--temperature 0``: greedy), ``top_p=None``, ``num_beams=1``, ``max_new_tokens=256``, ``use_cache=True``; no
stopping criteria besides EOS. Ours: the same, with a request's temperature when it sets one, and a cancel check
per step."""

from __future__ import annotations

import time
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
    eos_id: int,
    temperature: float = 0.0,
    should_stop=None,
    seed: int | None = None,
) -> Generated:
    """``embeds``: [L, H] prompt embeddings. Returns the new ids without EOS."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    state = {"why": "length"}

    class _Cancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if should_stop is not None and should_stop():
                state["why"] = "cancelled"
                return True
            return False

    kw: dict = {
        "max_new_tokens": max_new_tokens,
        "num_beams": 1,
        "use_cache": True,
        "stopping_criteria": StoppingCriteriaList([_Cancel()]),
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }
    if temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=None, top_k=None)
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
    if eos_id in ids:
        ids, why = ids[: ids.index(eos_id)], "eos"
    return Generated(ids=ids, stopped=why, prompt_tokens=n, seconds=time.perf_counter() - t0)
