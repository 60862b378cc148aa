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
    from backend.embeds_generate import generate_on_embeds

    begin = max(0, embeds.shape[0] + max_new_tokens - MAX_LENGTH)
    embeds = embeds[begin:]
    prompt_len = int(embeds.shape[0])
    d = generate_on_embeds(
        llm,
        embeds,
        max_new_tokens,
        eos_id,
        temperature=temperature,
        top_p=DEMO_TOP_P,
        seed=seed,
        should_stop=should_stop,
        stop_sequences=stops,
        extra={"repetition_penalty": 1.0},
    )
    ids, why = d.ids, d.why
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
    return Generated(ids=ids, stopped=why, prompt_tokens=prompt_len, prefill_and_decode_s=d.seconds)
