"""The static-cache decoder (our KV cache, SDPA, batch buckets; CUDA graphs on CUDA) against the transformers model
run without a cache and against the dynamic-cache loop."""

from __future__ import annotations

import pytest
import torch
from minigpt_fixtures import HIDDEN, tiny_files

from backend.minigpt.config import MiniGPTMedConfig
from backend.minigpt.generate import DEMO, generate
from backend.minigpt.static_decode import StaticDecoder, batch_buckets
from backend.minigpt.weights import LoadOptions, load_original


@pytest.fixture(scope="module")
def models():
    tiny = tiny_files()
    cfg = MiniGPTMedConfig.from_json(tiny.model_config)
    merged = load_original(tiny.eva, tiny.llama, tiny.checkpoint, cfg, LoadOptions(merge_lora=True))[0]
    unmerged = load_original(tiny.eva, tiny.llama, tiny.checkpoint, cfg, LoadOptions(merge_lora=False))[0]
    return merged.llm, unmerged.llm


def _prompts(seed: int, lengths) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, HIDDEN, generator=g) * 0.5 for n in lengths]


def test_buckets_are_powers_of_two_then_the_cap():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    dec_rows = [next(r for r in batch_buckets(8) if r >= b) for b in range(1, 9)]
    assert dec_rows == [1, 2, 4, 4, 8, 8, 8, 8]


def test_each_step_gives_the_logits_of_the_whole_sequence_run_without_a_cache(models):
    """Left padding, position ids, rotary and the cache write at ``cur``: each row's logits at every step equal the
    transformers model run from scratch on that row's own prompt + the tokens fed so far (no padding, no cache)."""
    llm = models[0]
    prompts = _prompts(1, (13, 6, 10))
    dec = StaticDecoder(llm, max_batch=4, max_len=40)
    seen: list[torch.Tensor] = []
    fed: list[list[int]] = [[] for _ in prompts]
    out = dec.generate(prompts, 5, eos_id=-1, bos_id=1, on_step=lambda ids: seen.append(torch.tensor(ids)))
    assert dec.bucket(len(prompts)) == 4 and out.steps == 5
    with torch.no_grad():
        for step, ids in enumerate(seen):
            for r, p in enumerate(prompts):
                x = torch.cat([p, llm.get_input_embeddings()(torch.tensor(fed[r], dtype=torch.long))]) if fed[r] else p
                want = llm(inputs_embeds=x[None]).logits[0, -1]
                assert int(want.argmax()) == int(ids[r]), (step, r)
                fed[r].append(int(ids[r]))
    assert [t for t in out.tokens] == fed


@pytest.mark.parametrize("lengths", [(11, 7), (9,)])  # left-padded (a mask), one whole prompt (plain causal)
def test_prefill_and_decode_logits_match_transformers_closely(models, lengths):
    llm = models[0]
    prompts = _prompts(2, lengths)
    dec = StaticDecoder(llm, max_batch=2, max_len=32)
    logits: list[torch.Tensor] = []
    import backend.minigpt.static_decode as sd

    real_run = sd._run

    def spy(prefill, step, *a, **k):  # keep every logits row the loop sees
        def p():
            out = prefill()
            logits.append(out.clone())
            return out

        def s(n):
            out = step(n)
            logits.append(out.clone())
            return out

        return real_run(p, s, *a, **k)

    sd._run = spy
    try:
        out = dec.generate(prompts, 3, eos_id=-1, bos_id=1)
    finally:
        sd._run = real_run
    with torch.no_grad():
        for r, p in enumerate(prompts):
            x = p
            for k in range(3):
                want = llm(inputs_embeds=x[None]).logits[0, -1]
                torch.testing.assert_close(logits[k][r], want, atol=1e-5, rtol=1e-5)
                x = torch.cat([x, llm.get_input_embeddings()(torch.tensor([out.tokens[r][k]]))])


def test_same_tokens_as_the_dynamic_loop_in_every_bucket_and_with_sampling(models):
    merged, unmerged = models
    prompts = _prompts(3, (30, 9, 21, 17, 5))
    maxes = [8, 5, 8, 3, 6]
    dec = StaticDecoder(merged, max_batch=8, max_len=48)
    for b in (1, 2, 3, 5):  # buckets 1, 2, 4, 8
        want = generate(merged, prompts[:b], maxes[:b], eos_id=2, bos_id=1, ignore_eos=True).tokens
        assert dec.generate(prompts[:b], maxes[:b], eos_id=2, bos_id=1, ignore_eos=True).tokens == want, b
    # the cache is reused: a shorter batch after a longer one sees nothing of it
    want1 = generate(merged, prompts[1:2], 5, eos_id=2, bos_id=1, ignore_eos=True).tokens
    assert dec.generate(prompts[1:2], 5, eos_id=2, bos_id=1, ignore_eos=True).tokens == want1
    # LoRA not merged: the wrappers are the model's own modules
    undec = StaticDecoder(unmerged, max_batch=4, max_len=48)
    want = generate(unmerged, prompts[:3], maxes[:3], eos_id=2, bos_id=1, ignore_eos=True).tokens
    assert undec.generate(prompts[:3], maxes[:3], eos_id=2, bos_id=1, ignore_eos=True).tokens == want
    # seeded sampling with the repetition penalty takes the same draws
    s = dict(eos_id=2, bos_id=1, settings=DEMO, seed=7, ignore_eos=True)
    assert dec.generate(prompts[:2], 12, **s).tokens == generate(merged, prompts[:2], 12, **s).tokens


def test_eos_ends_rows_and_limits_are_enforced(models):
    llm = models[0]
    prompts = _prompts(4, (12, 20))
    free = generate(llm, prompts, 10, eos_id=-1, bos_id=1).tokens
    eos = free[0][3]  # a token row 0 emits at its 4th step: row 0 stops there
    dec = StaticDecoder(llm, max_batch=2, max_len=40)
    got = dec.generate(prompts, 10, eos_id=eos, bos_id=1)
    want = generate(llm, prompts, 10, eos_id=eos, bos_id=1)
    assert got.tokens == want.tokens and got.finished == want.finished
    assert got.tokens[0] == free[0][: free[0].index(eos)] and got.finished[0]
    assert dec.max_len == 48  # rounded up to a multiple of 16
    with pytest.raises(ValueError, match="batch 3 > max_batch 2"):
        dec.generate(_prompts(5, (4, 4, 4)), 2, eos_id=2, bos_id=1)
    with pytest.raises(ValueError, match=r"prompt 40 \+ 9 new tokens > max_len 48"):
        dec.generate(_prompts(6, (40,)), 9, eos_id=2, bos_id=1)


def test_grouped_query_attention(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    llm = LlamaForCausalLM(cfg).eval()
    prompts = _prompts(7, (14, 9, 3))
    want = generate(llm, prompts, 6, eos_id=-1, bos_id=1).tokens
    dec = StaticDecoder(llm, max_batch=4, max_len=32)
    assert dec.k[0].shape == (4, 2, 32, 8)
    assert dec.generate(prompts, 6, eos_id=-1, bos_id=1).tokens == want


def test_a_replay_that_differs_from_the_eager_step_is_caught(models):
    """``check_graphs`` (run after capture on CUDA) on this CPU with stand-ins for the captured graphs: a faithful
    replay (the eager step itself) passes; one that leaves the output alone, as a step with a host value frozen at
    capture would give wrong logits, is named."""
    dec = StaticDecoder(models[0], max_batch=2, max_len=32)

    class Replay:
        def __init__(self, fn):
            self.replay = fn

    dec._graphs = {1: Replay(lambda: dec._step(1)), 2: Replay(lambda: dec._step(2))}
    assert dec.check_graphs() == ""
    dec._graphs[2] = Replay(lambda: dec.out[:2].mul_(0.5))
    assert dec.check_graphs().startswith("batch 2: max |difference| ")
