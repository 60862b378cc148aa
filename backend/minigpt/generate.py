"""Decoding: a small explicit loop over the transformers LLaMA with a KV cache.

* Greedy by default (the original's benchmark evaluation: ``do_sample=False``, ``num_beams=1``, stop at eos 2).
  The LLaMA folder's ``generation_config.json`` (Llama-2-chat asks for sampling, T 0.6, top_p 0.9) is never
  consulted: settings come only from here.
* ``DEMO`` reproduces the original Gradio demo: T 0.6 (slider default), top_p 0.9, top_k 50 (HF default),
  repetition_penalty 1.05 applied, as transformers 4.30 did with ``inputs_embeds`` only, to ``[BOS] + generated``.
* Batches are LEFT-padded with zero embedding vectors and attention mask 0, position ids = cumsum(mask) - 1, as
  ``MiniGPTBase.generate``; finished rows keep running (their tokens are discarded).
* Streaming and cancel (both optional, both checked between decode steps): ``on_step(tokens)`` receives the ids
  chosen at each step, one per row (eos for a finished row; it costs a host sync per step, so only streaming
  requests pass it); ``row_stopped()`` says which rows were cancelled: a cancelled row is dropped (its tokens
  discarded, ``cancelled`` set) and counts as finished (it no longer keeps the loop going for the others), and the
  loop ends as soon as no row is left, so the engine is free within one step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingSettings:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    name: str = "greedy"


GREEDY = SamplingSettings()
DEMO = SamplingSettings(do_sample=True, temperature=0.6, top_p=0.9, top_k=50, repetition_penalty=1.05, name="demo")
DEMO_MAX_NEW_TOKENS = 500


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per row, eos excluded
    finished: list[bool]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    prompt_lengths: list[int] = field(default_factory=list)
    cancelled: list[bool] = field(default_factory=list)


StepCallback = Callable[[list[int]], None]  # the ids chosen at one decode step, one per row
RowStopped = Callable[[], Sequence[bool]]  # which rows were cancelled


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warp(
    logits: torch.Tensor, s: SamplingSettings, history: torch.Tensor, gen: torch.Generator | None
) -> torch.Tensor:
    """Next tokens [B] from logits [B,V] (fp32)."""
    if s.repetition_penalty != 1.0:
        score = torch.gather(logits, 1, history)
        score = torch.where(score < 0, score * s.repetition_penalty, score / s.repetition_penalty)
        logits = logits.scatter(1, history, score)
    if not s.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k > 0:
        k = min(s.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - s.top_p)
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def _decode_loop(
    logits: torch.Tensor,
    step_fn,
    b: int,
    maxes: list[int],
    eos_id: int,
    bos_id: int,
    settings: SamplingSettings,
    stop,
    gen,
    ignore_eos: bool,
    check_every: int = 8,
    on_step: StepCallback | None = None,
    row_stopped: RowStopped | None = None,
):
    """Token choice + feeding back, without a host sync per step: tokens stay on the device and finished rows are
    checked every ``check_every`` steps (the extra steps of finished rows are discarded). ``logits`` has
    >= b rows; ``step_fn(next_ids [rows])`` returns the next logits. Returns (tokens per row, finished, steps,
    cancelled per row)."""
    rows = logits.shape[0]
    device = logits.device
    history = torch.full((rows, 1), bos_id, dtype=torch.long, device=device)  # 4.30: ids start with [BOS]
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    limits = torch.tensor(maxes + [0] * (rows - b), device=device)
    cols: list[torch.Tensor] = []
    longest = max(maxes) if maxes else 0
    cancelled = [False] * b
    while len(cols) < longest:
        if stop is not None:
            stop.check()
        if row_stopped is not None:
            now = [bool(c) for c in row_stopped()][:b]
            if all(now):
                cancelled = now
                break
            if now != cancelled:  # a cancelled row is finished: it emits eos and no longer keeps the loop going
                cancelled = now
                gone = torch.tensor(cancelled + [False] * (rows - b), device=device)
                unfinished = unfinished & ~gone
                limits = torch.where(gone, torch.zeros_like(limits), limits)
        nxt = _warp(logits, settings, history, gen)
        if not ignore_eos:
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, eos_id))
            unfinished = unfinished & (nxt != eos_id)
        cols.append(nxt)
        if on_step is not None:
            on_step([int(t) for t in nxt[:b].tolist()])
        if len(cols) >= longest:
            break
        if len(cols) % check_every == 0 and not bool((unfinished & (limits > len(cols))).any()):
            break
        if settings.repetition_penalty != 1.0:
            history = torch.cat([history, nxt[:, None]], dim=1)
        logits = step_fn(nxt)
    ids = torch.stack(cols, 1).tolist() if cols else [[] for _ in range(rows)]
    tokens, finished = [], []
    for i in range(b):
        row = ids[i][: maxes[i]]
        if not ignore_eos and eos_id in row:
            row = row[: row.index(eos_id)]
            finished.append(True)
        else:
            finished.append(False)
        if cancelled[i]:
            row, finished[-1] = [], False
        tokens.append(row)
    return tokens, finished, len(cols), cancelled


def _row_limits(max_new_tokens: Sequence[int] | int, b: int) -> list[int]:
    return [int(max_new_tokens)] * b if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]


def _left_pad(
    embeds: Sequence[torch.Tensor], rows: int, mask_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Prompts [L_i, H] -> (x [rows, L, H] left-padded with zeros, attention mask [rows, mask_len] (1 on the prompt
    tokens), position ids [rows, L] = cumsum(mask) - 1, prompt lengths). Rows past ``len(embeds)`` are padding: one
    masked-in position keeps them finite."""
    b = len(embeds)
    device = embeds[0].device
    lens = [int(e.shape[0]) for e in embeds]
    L, H = max(lens), int(embeds[0].shape[-1])
    x = torch.zeros(rows, L, H, dtype=embeds[0].dtype, device=device)
    mask = torch.zeros(rows, mask_len, dtype=torch.long, device=device)
    for i, e in enumerate(embeds):
        x[i, L - lens[i] :] = e
        mask[i, L - lens[i] : L] = 1
    mask[b:, L - 1] = 1
    pos = mask[:, :L].cumsum(-1) - 1
    pos.masked_fill_(mask[:, :L] == 0, 1)
    return x, mask, pos, lens


def _run(
    prefill: Callable[[], torch.Tensor],
    step: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    maxes: list[int],
    lens: list[int],
    eos_id: int,
    bos_id: int,
    settings: SamplingSettings,
    stop,
    seed: int | None,
    ignore_eos: bool,
    on_step: StepCallback | None = None,
    row_stopped: RowStopped | None = None,
) -> GenerationOutput:
    """Seed, time the prefill (-> last logits) and the decode loop, and collect the output."""
    gen = None
    if settings.do_sample:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else int(torch.seed() % (2**63)))
    t0 = time.perf_counter()
    logits = prefill()
    _sync(device)
    t1 = time.perf_counter()
    tokens, finished, steps, cancelled = _decode_loop(
        logits,
        step,
        len(maxes),
        maxes,
        eos_id,
        bos_id,
        settings,
        stop,
        gen,
        ignore_eos,
        on_step=on_step,
        row_stopped=row_stopped,
    )
    _sync(device)
    t2 = time.perf_counter()
    return GenerationOutput(
        tokens=tokens,
        finished=finished,
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        steps=steps,
        prompt_lengths=lens,
        cancelled=cancelled,
    )


@torch.no_grad()
def generate(
    llm,
    embeds: Sequence[torch.Tensor],
    max_new_tokens: Sequence[int] | int,
    eos_id: int,
    bos_id: int,
    settings: SamplingSettings = GREEDY,
    stop=None,
    seed: int | None = None,
    ignore_eos: bool = False,
    on_step: StepCallback | None = None,
    row_stopped: RowStopped | None = None,
) -> GenerationOutput:
    """``embeds``: one [L_i, H] prompt embedding per row. Returns the generated ids per row."""
    from transformers import DynamicCache

    b = len(embeds)
    maxes = _row_limits(max_new_tokens, b)
    L = max(int(e.shape[0]) for e in embeds)
    x, mask, pos, lens = _left_pad(embeds, b, L)
    cache = DynamicCache(config=llm.config)

    def prefill():
        out = llm(
            inputs_embeds=x,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    state = {"mask": mask, "pos": pos[:, -1:]}

    def step(nxt):
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(b, 1)], dim=1)
        state["pos"] = state["pos"] + 1
        o = llm(
            input_ids=nxt[:, None],
            attention_mask=state["mask"],
            position_ids=state["pos"],
            past_key_values=cache,
            use_cache=True,
        )
        return o.logits[:, -1].float()

    return _run(
        prefill, step, x.device, maxes, lens, eos_id, bos_id, settings, stop, seed, ignore_eos, on_step, row_stopped
    )
