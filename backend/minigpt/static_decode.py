"""The fast decode path: a preallocated KV cache of our own and one CUDA graph per batch bucket (the gpt-fast recipe,
on the transformers LLaMA's own modules).

* The cache: per layer, keys and values ``[max_batch, kv_heads, max_len, head_dim]`` in the model's dtype, allocated
  once. A batch runs in the smallest bucket (1, 2, 4, ... up to ``max_batch``) that holds it, on the first rows of the
  cache, so one request reads one row of cache per step, not ``max_batch``.
* Attention is torch's ``scaled_dot_product_attention`` (FlashAttention / memory-efficient kernels on CUDA) over the
  cache with a boolean mask of the valid positions; everything else in a layer (norms, projections with their LoRA
  wrappers, rotary embedding, MLP, head) is the transformers model's own modules, so the numbers are the model's.
* Prefill runs eagerly and writes positions ``0 .. L-1``; each decode step writes position ``cur``. The step's inputs
  (next ids, position ids, valid mask, ``cur``) live in fixed buffers and the step updates them itself, so on CUDA it
  is captured once per bucket into a ``torch.cuda.CUDAGraph`` by :meth:`StaticDecoder.capture` (the engine calls it at
  load; about a second a bucket, against torch.compile's minutes) and each token is one graph replay. Elsewhere (CPU,
  before the capture, or if it fails) the same step runs eagerly.
* Same left padding, position ids and token choice as ``generate.generate`` (``_left_pad``, ``_run``), so answers are
  the same (identical on CPU in fp32: tested).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from backend.minigpt.generate import (
    GREEDY,
    GenerationOutput,
    RowStopped,
    SamplingSettings,
    StepCallback,
    _left_pad,
    _row_limits,
    _run,
)

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below ``max_batch``, then ``max_batch``."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class StaticDecoder:
    """Greedy/sampled decoding for up to ``max_batch`` rows and ``max_len`` positions (prompt + new tokens).
    ``graphs=False`` keeps a CUDA model's decode steps out of CUDA graphs (elsewhere there are none). ``max_len`` is
    rounded up to a multiple of 16."""

    def __init__(self, llm: Any, max_batch: int, max_len: int, graphs: bool | None = None):
        cfg = llm.config
        self.llm = llm
        self.layers = list(llm.model.layers)
        self.embed = llm.get_input_embeddings()
        self.rotary = llm.model.rotary_emb
        self.max_batch = int(max_batch)
        self.max_len = -(-int(max_len) // 16) * 16  # aligned rows for the attention kernels' masks
        self.buckets = batch_buckets(self.max_batch)
        w = self.embed.weight
        self.device, self.dtype = w.device, w.dtype
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.gqa = int(cfg.num_attention_heads) != self.kv_heads
        shape = (self.max_batch, self.kv_heads, self.max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        # the decode step's inputs and output, fixed in memory (a CUDA graph reads and writes these addresses)
        self.ids = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(self.max_batch, 1, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(self.max_batch, self.max_len, dtype=torch.bool, device=self.device)
        self.cur = torch.zeros(1, dtype=torch.long, device=self.device)
        self.out = torch.zeros(self.max_batch, int(cfg.vocab_size), dtype=torch.float32, device=self.device)
        self.use_graphs = self.device.type == "cuda" and graphs is not False
        self._graphs: dict[int, Any] = {}
        self.capture_s = 0.0

    # -- the model, on our cache ------------------------------------------------------------------------------------

    def _forward(self, h: torch.Tensor, pos: torch.Tensor, where: torch.Tensor, mask: torch.Tensor | None, keys: int):
        """``h`` [rows, T, hidden] at position ids ``pos`` [rows, T]; writes cache positions ``where`` [T]; attends to
        cache positions ``0 .. keys-1`` under ``mask`` [rows, 1, T, keys] (True = attend; None = causal, for a
        prefill without padding: FlashAttention's case). Returns the last position's logits [rows, vocab] in fp32."""
        rows, t = h.shape[0], h.shape[1]
        cos, sin = self.rotary(h, pos)
        cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(rows, t, -1, self.head_dim).transpose(1, 2)
            k = a.k_proj(x).view(rows, t, -1, self.head_dim).transpose(1, 2)
            v = a.v_proj(x).view(rows, t, -1, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self.k[i][:rows], self.v[i][:rows]
            kc.index_copy_(2, where, k)
            vc.index_copy_(2, where, v)
            o = F.scaled_dot_product_attention(
                q,
                kc[:, :, :keys],
                vc[:, :, :keys],
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.scaling,
                enable_gqa=self.gqa,
            )
            h = h + a.o_proj(o.transpose(1, 2).reshape(rows, t, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.llm.lm_head(self.llm.model.norm(h[:, -1:]))[:, -1].float()

    def _step(self, rows: int) -> None:
        """One decode step for the first ``rows`` rows, entirely on the device buffers: the token ``ids`` at position
        ``pos`` goes to cache position ``cur``; logits land in ``out``; ``pos`` and ``cur`` move on."""
        valid = self.valid[:rows]
        valid.index_fill_(1, self.cur, True)
        h = self.embed(self.ids[:rows, None])
        logits = self._forward(h, self.pos[:rows], self.cur, valid[:, None, None, :], self.max_len)
        self.out[:rows].copy_(logits)
        self.pos[:rows].add_(1)
        self.cur.add_(1)

    # -- CUDA graphs --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every bucket's decode step (CUDA only; a failure turns graphs off and leaves eager decoding)."""
        if not self.use_graphs or self._graphs:
            return
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        try:
            for rows in self.buckets:
                self.valid.zero_()
                self.pos.zero_()
                self.cur.zero_()
                side = torch.cuda.Stream(device=self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm-up outside the graph (allocator, cuBLAS handles)
                        self._step(rows)
                torch.cuda.current_stream(self.device).wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self._step(rows)
                self._graphs[rows] = g
            torch.cuda.synchronize(self.device)
            bad = self.check_graphs()
            if bad:
                raise RuntimeError(f"a replay differs from the eager step: {bad}")
        except RuntimeError as e:  # an op that cannot be captured on this torch / transformers: decode eagerly
            log.warning("CUDA graphs are off (%s); decoding without them", str(e).splitlines()[0][:200])
            self._graphs.clear()
            self.use_graphs = False
        self.capture_s = time.perf_counter() - t0

    @torch.no_grad()
    def check_graphs(self) -> str:
        """Each bucket's replay against its eager step from the same state (one cached position, random ids): the
        logits must agree (a step that read a host value at capture would not). '' when all agree, else which."""
        g = torch.Generator(device=self.device).manual_seed(0)
        vocab = self.out.shape[1]
        for rows, graph in self._graphs.items():
            ids = torch.randint(3, vocab, (rows,), generator=g, device=self.device)
            outs = []
            for run in (functools.partial(self._step, rows), graph.replay):
                self.valid.zero_()
                self.valid[:rows, 0] = True
                self.pos.fill_(1)
                self.cur.fill_(1)
                self.ids[:rows].copy_(ids)
                run()
                outs.append(self.out[:rows].clone())
            eager, replay = outs
            err = float((eager - replay).abs().max())
            if not err <= 1e-3 * float(eager.abs().max()) + 1e-3:  # also catches NaN
                return f"batch {rows}: max |difference| {err:.3g}"
        return ""

    def bucket(self, b: int) -> int:
        return next(r for r in self.buckets if r >= b)

    # -- generation ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
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
        b = len(embeds)
        if b > self.max_batch:
            raise ValueError(f"batch {b} > max_batch {self.max_batch}")
        maxes = _row_limits(max_new_tokens, b)
        L = max(int(e.shape[0]) for e in embeds)
        if L + max(maxes) > self.max_len:
            raise ValueError(f"prompt {L} + {max(maxes)} new tokens > max_len {self.max_len}")
        rows = self.bucket(b)
        x, mask, pos, lens = _left_pad(embeds, rows, self.max_len)
        graph = self._graphs.get(rows)  # None before capture(), or with graphs off: the same step, eagerly
        device = x.device

        def prefill() -> torch.Tensor:
            valid = self.valid[:rows]
            valid.copy_(mask.bool())
            allowed = None  # every row a whole prompt: plain causal attention
            if rows > b or min(lens) < L:
                keys = valid[:, :L]
                causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
                eye = torch.eye(L, dtype=torch.bool, device=device)  # a padding query attends to itself (no NaN)
                allowed = ((causal & keys[:, None, :]) | eye)[:, None]
            logits = self._forward(x, pos, torch.arange(L, device=device), allowed, L)
            self.pos[:rows].copy_(pos[:, -1:] + 1)
            self.cur.fill_(L)
            return logits

        def step(nxt: torch.Tensor) -> torch.Tensor:
            self.ids[:rows].copy_(nxt)
            if graph is not None:
                graph.replay()
            else:
                self._step(rows)
            return self.out[:rows]  # read before the next step overwrites it (``_decode_loop`` does)

        return _run(
            prefill, step, device, maxes, lens, eos_id, bos_id, settings, stop, seed, ignore_eos, on_step, row_stopped
        )
