"""XrayGPT's decoding (``Chat.answer`` in xraygpt/conversation/conversation.py @ d0baa6a), with transformers'
``generate`` on the prompt embeddings.

* The demo samples (``do_sample=True``, ``top_p=0.9``, temperature slider default 1.0, ``num_beams=1``,
  ``repetition_penalty=1.0``, ``max_new_tokens=300``); we decode greedily unless the request sets a temperature,
  then sample with the demo's ``top_p`` 0.9.
* The context is cut from the left to ``max_length - max_new_tokens`` (``max_length=2000``), as the demo does.
* It stops on either spelling of ``###`` (``template.stop_sequences``), on EOS, on the request's deadline, or at the
  token limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

DEMO_TOP_P = 0.9
DEMO_MAX_NEW_TOKENS = 300
MAX_LENGTH = 2000


@dataclass
class Generated:
    ids: list[int]
    stopped: str  # "stop_word", "eos", "length", "cancelled"
    prompt_tokens: int
    prefill_and_decode_s: float


def generate(
    llm,
    embeds: torch.Tensor,
    max_new_tokens: int,
    stops: list[list[int]],
    eos_id: int,
    temperature: float = 0.0,
    should_stop=None,
    seed: int | None = None,
) -> Generated:
    """``embeds``: [L, H] prompt embeddings. Returns the new ids without the stop word or EOS."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    begin = max(0, embeds.shape[0] + max_new_tokens - MAX_LENGTH)
    embeds = embeds[begin:]
    prompt_len = int(embeds.shape[0])
    state = {"why": "length"}

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            row = input_ids[0].tolist()
            for s in stops:
                if len(row) >= len(s) and row[-len(s) :] == s:
                    state["why"] = "stop_word"
                    return True
            if should_stop is not None and should_stop():
                state["why"] = "cancelled"
                return True
            return False

    kw: dict = {
        "max_new_tokens": max_new_tokens,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "stopping_criteria": StoppingCriteriaList([_Stop()]),
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }
    if temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=DEMO_TOP_P, top_k=None)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    t0 = time.perf_counter()
    mask = torch.ones(1, prompt_len, dtype=torch.long, device=embeds.device)
    out = llm.generate(inputs_embeds=embeds[None], attention_mask=mask, **kw)
    ids = [int(i) for i in out[0].tolist()]
    why = state["why"]
    if ids and ids[-1] == eos_id:
        ids, why = ids[:-1], "eos"
    elif why == "stop_word":
        for s in stops:
            if ids[-len(s) :] == s:
                ids = ids[: -len(s)]
                break
    # the original drops a leading <unk> (0) and then a leading <s> (1)
    if ids and ids[0] == 0:
        ids = ids[1:]
    if ids and ids[0] == 1:
        ids = ids[1:]
    return Generated(ids=ids, stopped=why, prompt_tokens=prompt_len, prefill_and_decode_s=time.perf_counter() - t0)
