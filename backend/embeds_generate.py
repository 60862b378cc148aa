"""transformers' ``generate`` on prompt embeddings, as the XrayGPT and LLaVA engines run it: one row, greedy unless
a temperature is given (then sampling with the model's ``top_p`` and ``top_k``), a stopping criterion that feeds the streaming
callback, ends at a stop-token sequence and checks the cancel flag after every step. What each model trims from the
answer (stop words, EOS, leading tokens) and how it cuts its context stays with the model."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Decoded:
    ids: list[int]  # every generated id, stop tokens included
    why: str  # "length", "stop_word" or "cancelled" (EOS is the model's to tell from ``ids``)
    seconds: float


def generate_on_embeds(
    llm,
    embeds: torch.Tensor,
    max_new_tokens: int,
    eos_ids: int | Sequence[int],
    *,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    on_step: Callable[[list[int]], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> Decoded:
    """``embeds``: [L, H] prompt embeddings; ``eos_ids`` end the answer (transformers stops on any of them; the
    first is the pad id); ``extra``: more ``generate`` keyword arguments (e.g. ``repetition_penalty``)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    eos = [eos_ids] if isinstance(eos_ids, int) else [int(i) for i in eos_ids]
    seqs = [list(s) for s in stop_sequences]
    state = {"why": "length"}

    class _Step(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            row = [int(i) for i in input_ids[0].tolist()]
            if on_step is not None:
                on_step(row)
            for s in seqs:
                if len(row) >= len(s) and row[-len(s) :] == s:
                    state["why"] = "stop_word"
                    return True
            if should_stop is not None and should_stop():
                state["why"] = "cancelled"
                return True
            return False

    kw: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "num_beams": 1,
        "use_cache": True,
        "stopping_criteria": StoppingCriteriaList([_Step()]),
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": eos[0],
        **(extra or {}),
    }
    if temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=top_p, top_k=top_k)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    t0 = time.perf_counter()
    mask = torch.ones(1, int(embeds.shape[0]), dtype=torch.long, device=embeds.device)
    out = llm.generate(inputs_embeds=embeds[None], attention_mask=mask, **kw)
    return Decoded(ids=[int(i) for i in out[0].tolist()], why=state["why"], seconds=time.perf_counter() - t0)
