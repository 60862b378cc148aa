"""MiniGPT-Med model code against independent references, and the strict loader on the original file layout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from minigpt_fixtures import HIDDEN, LAYERS, VISION, tiny_files

from backend.minigpt.config import MiniGPTMedConfig
from backend.minigpt.eva_vit import interpolate_pos_embed
from backend.minigpt.model import LoraLinear
from backend.minigpt.preprocess import preprocess
from backend.minigpt.weights import LoadOptions, WeightsError, load_checkpoint, load_original


@pytest.fixture(scope="module")
def tiny():
    return tiny_files()


@pytest.fixture(scope="module")
def cfg(tiny):
    return MiniGPTMedConfig.from_json(tiny.model_config)


@pytest.fixture(scope="module")
def merged(tiny, cfg):
    return load_original(tiny.eva, tiny.llama, tiny.checkpoint, cfg, LoadOptions(merge_lora=True))


@pytest.fixture(scope="module")
def unmerged(tiny, cfg):
    return load_original(tiny.eva, tiny.llama, tiny.checkpoint, cfg, LoadOptions(merge_lora=False))


def _ckpt_model(tiny) -> dict:
    return torch.load(tiny.checkpoint, weights_only=True)["model"]


def test_checkpoint_layout_loads_with_nothing_missing_or_unexpected(merged, tiny):
    model, report = merged
    sd = _ckpt_model(tiny)
    assert len(sd) == 2 + LAYERS * 5  # proj + 4 LoRA + inv_freq per layer, as the original saver writes
    assert report.loaded == {
        "llm": len(model.llm.state_dict()),
        "vision": 4 + 13 * VISION["depth"],
        "llama_proj": 2,
        "lora": LAYERS * 4,
    }
    assert report.lora == "merged"
    # the checkpoint's 40th-block equivalent and the inv_freq buffers are the only things ignored
    assert set(report.ignored["eva"]) == {
        k for k in torch.load(tiny.eva, weights_only=True) if k.startswith(f"blocks.{VISION['depth']}.")
    }
    assert len(report.ignored["checkpoint"]) == LAYERS and all("inv_freq" in k for k in report.ignored["checkpoint"])
    assert torch.equal(model.ln_vision.weight, torch.ones(VISION["width"]))
    assert torch.equal(model.ln_vision.bias, torch.zeros(VISION["width"]))
    assert torch.equal(model.llama_proj.weight, sd["llama_proj.weight"])
    assert model.visual_encoder.pos_embed.shape == (1, 32 * 32 + 1, VISION["width"])
    assert len(model.visual_encoder.blocks) == VISION["depth"]


def _naive_eva(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """A from-scratch EVA forward (explicit q*scale @ k^T softmax) straight from the file's tensors."""
    w, heads, depth = VISION["width"], VISION["heads"], VISION["depth"]
    sd = {k: v.float() for k, v in sd.items()}
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=VISION["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    old = sd["pos_embed"][:, 1:].reshape(1, 16, 16, w).permute(0, 3, 1, 2)
    new = F.interpolate(old, size=(32, 32), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 1024, w)
    x = torch.cat([sd["cls_token"], x], 1) + torch.cat([sd["pos_embed"][:, :1], new], 1)
    hd = w // heads
    for i in range(depth):
        p = lambda n, i=i: sd[f"blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (w,), p("norm1.weight"), p("norm1.bias"), 1e-6)
        bias = torch.cat([p("attn.q_bias"), torch.zeros(w), p("attn.v_bias")])
        q, k, v = (h @ p("attn.qkv.weight").T + bias).reshape(1, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        a = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x + a.transpose(1, 2).reshape(1, -1, w) @ p("attn.proj.weight").T + p("attn.proj.bias")
        h = F.layer_norm(x, (w,), p("norm2.weight"), p("norm2.bias"), 1e-6)
        x = x + F.gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")) @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
    return x


def test_vision_path_matches_naive_reference(merged, tiny):
    model, _ = merged
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (70, 90), dtype=np.uint8)
    px = preprocess(img)[None]
    ref = _naive_eva(torch.load(tiny.eva, weights_only=True), px)
    ref = F.layer_norm(ref, (VISION["width"],), eps=1e-5)[:, 1:]  # ln_vision = weight 1, bias 0
    # 4 horizontally adjacent patches -> one token: group k = patches 4k..4k+3 of the row-major 32x32 grid
    groups = torch.stack([torch.cat([ref[0, 4 * k + j] for j in range(4)]) for k in range(256)])
    assert torch.equal(groups[8], torch.cat([ref[0, 32 + j] for j in range(4)]))  # group 8 = row 1, columns 0..3
    sd = _ckpt_model(tiny)
    want = groups @ sd["llama_proj.weight"].T + sd["llama_proj.bias"]
    got = model.encode_images(px)[0]
    assert got.shape == (256, HIDDEN)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_pos_embed_interpolation_is_bicubic_fp32():
    pe = torch.randn(1, 257, 8, dtype=torch.float16)
    out = interpolate_pos_embed(pe, 32)
    assert out.shape == (1, 1025, 8) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], pe[:, 0].float())
    corner = F.interpolate(pe[:, 1:].float().reshape(1, 16, 16, 8).permute(0, 3, 1, 2), size=(32, 32), mode="bicubic")
    torch.testing.assert_close(out[0, 1:].reshape(32, 32, 8).permute(2, 0, 1), corner[0])


def _reference_llm(tiny):
    """transformers LlamaForCausalLM + peft LoRA, loaded independently from the same files."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(tiny.llama), dtype=torch.float32).eval()
    pm = get_peft_model(
        base,
        LoraConfig(
            r=64,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    sd = {k[len("llama_model.") :]: v for k, v in _ckpt_model(tiny).items() if "lora_" in k}
    res = set_peft_model_state_dict(pm, sd)
    assert not res.unexpected_keys
    return pm.eval()


def test_llm_matches_transformers_and_peft_reference(merged, unmerged, tiny):
    ref = _reference_llm(tiny)
    torch.manual_seed(0)
    x = torch.randn(2, 40, HIDDEN) * 0.5
    with torch.no_grad():
        want = ref(inputs_embeds=x).logits
        base = ref.get_base_model()
        with ref.disable_adapter():
            no_lora = base(inputs_embeds=x).logits
        got_unmerged = unmerged[0].llm(inputs_embeds=x).logits
        got_merged = merged[0].llm(inputs_embeds=x).logits
    assert (want - no_lora).abs().max() > 1e-3  # the LoRA matters
    torch.testing.assert_close(got_unmerged, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_merged, want, atol=1e-4, rtol=1e-4)
    assert isinstance(unmerged[0].llm.model.layers[0].self_attn.q_proj, LoraLinear)
    assert not isinstance(merged[0].llm.model.layers[0].self_attn.q_proj, LoraLinear)


def test_merged_and_unmerged_generate_the_same_tokens(merged, unmerged):
    from backend.minigpt.generate import generate

    torch.manual_seed(1)
    prompts = [torch.randn(30, HIDDEN) * 0.5, torch.randn(22, HIDDEN) * 0.5]
    a = generate(merged[0].llm, prompts, 12, eos_id=2, bos_id=1)
    b = generate(unmerged[0].llm, prompts, 12, eos_id=2, bos_id=1)
    assert a.tokens == b.tokens and sum(map(len, a.tokens)) > 0


def test_greedy_batch_equals_one_at_a_time(merged):
    from backend.minigpt.generate import generate

    llm = merged[0].llm
    torch.manual_seed(2)
    prompts = [torch.randn(n, HIDDEN) * 0.5 for n in (35, 12, 27, 35)]
    batch = generate(llm, prompts, [10, 6, 10, 3], eos_id=2, bos_id=1, ignore_eos=True)
    single = [
        generate(llm, [p], m, eos_id=2, bos_id=1, ignore_eos=True).tokens[0]
        for p, m in zip(prompts, [10, 6, 10, 3], strict=True)
    ]
    assert batch.tokens == single
    assert [len(t) for t in batch.tokens] == [10, 6, 10, 3]


def test_demo_sampling_is_seeded_and_differs_from_greedy(merged):
    from backend.minigpt.generate import DEMO, GREEDY, generate

    llm = merged[0].llm
    torch.manual_seed(4)
    p = [torch.randn(20, HIDDEN)]
    s1 = generate(llm, p, 30, eos_id=2, bos_id=1, settings=DEMO, seed=7, ignore_eos=True).tokens
    s2 = generate(llm, p, 30, eos_id=2, bos_id=1, settings=DEMO, seed=7, ignore_eos=True).tokens
    g = generate(llm, p, 30, eos_id=2, bos_id=1, settings=GREEDY, ignore_eos=True).tokens
    assert s1 == s2
    assert s1 != g
    assert DEMO.temperature == 0.6 and DEMO.top_p == 0.9 and DEMO.top_k == 50 and DEMO.repetition_penalty == 1.05


def test_stop_token_cancels_generation(merged):
    from backend.engines.base import EngineCancelled, StopToken
    from backend.minigpt.generate import generate

    stop = StopToken()
    stop.event.set()
    with pytest.raises(EngineCancelled):
        generate(merged[0].llm, [torch.randn(5, HIDDEN)], 5, eos_id=2, bos_id=1, stop=stop)


# ---- clear errors ------------------------------------------------------------------------------------------------


def test_13b_base_is_refused_with_a_clear_message(tmp_path, tiny):
    big = tmp_path / "Llama-2-13b-chat-hf"
    big.mkdir()
    cj = json.loads((tiny.llama / "config.json").read_text())
    cj.update(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40)
    (big / "config.json").write_text(json.dumps(cj))
    with pytest.raises(WeightsError, match="needs the 7B LLaMA-2 base: hidden size 4096 expected, found 5120"):
        load_original(tiny.eva, big, tiny.checkpoint, MiniGPTMedConfig.real(), LoadOptions())


def test_minigpt4_v1_checkpoint_is_recognised(tmp_path, tiny, cfg):
    p = tmp_path / "prerained_minigpt4_7b.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(HIDDEN, 768), "llama_proj.bias": torch.zeros(HIDDEN)}}, p)
    with pytest.raises(WeightsError, match=r"MiniGPT-4 \(v1\) checkpoint"):
        load_original(tiny.eva, tiny.llama, p, cfg, LoadOptions())


def test_missing_and_unexpected_checkpoint_keys_are_named(tmp_path, tiny, cfg):
    sd = _ckpt_model(tiny)
    gone = "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    p = tmp_path / "c.pth"
    torch.save({"model": {k: v for k, v in sd.items() if k != gone}}, p)
    with pytest.raises(WeightsError, match=r"missing keys.*layers\.1\.self_attn\.v_proj\.lora_B\.weight"):
        load_checkpoint(p, cfg, LAYERS, HIDDEN)
    torch.save({"model": {**sd, "llama_model.base_model.model.model.norm.weight": torch.ones(HIDDEN)}}, p)
    with pytest.raises(WeightsError, match=r"unexpected keys.*model\.norm\.weight"):
        load_checkpoint(p, cfg, LAYERS, HIDDEN)
    # peft >= 0.3 names (with .default) are accepted too
    torch.save({"model": {k.replace(".weight", ".default.weight") if "lora_" in k else k: v for k, v in sd.items()}}, p)
    assert len(load_checkpoint(p, cfg, LAYERS, HIDDEN).lora) == LAYERS * 4


def test_missing_eva_key_and_pickled_objects_are_clear_errors(tmp_path, tiny, cfg):
    eva = torch.load(tiny.eva, weights_only=True)
    del eva["blocks.1.attn.q_bias"]
    p = tmp_path / "eva_vit_g.pth"
    torch.save(eva, p)
    with pytest.raises(WeightsError, match=r"missing keys for EVA ViT-g.*blocks\.1\.attn\.q_bias"):
        load_original(p, tiny.llama, tiny.checkpoint, cfg, LoadOptions())
    q = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": shutil.Error("not a tensor")}, q)
    with pytest.raises(WeightsError, match="turn on trust_checkpoints"):
        load_checkpoint(q, cfg, LAYERS, HIDDEN)
    with pytest.raises(WeightsError) as trusted:  # the setting lets torch.load read it; the empty model stays wrong
        load_checkpoint(q, cfg, LAYERS, HIDDEN, trust=True)
    assert "trust_checkpoints" not in str(trusted.value)


def test_quantize_without_bitsandbytes_is_a_clear_error(tiny, cfg, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed: import raises ImportError
    with pytest.raises(WeightsError, match="bitsandbytes"):
        load_original(tiny.eva, tiny.llama, tiny.checkpoint, cfg, LoadOptions(quantize="8bit"))


@pytest.mark.parametrize("shape", [(70, 90), (215, 390), (512, 384)])
def test_gray_images_resize_as_one_band_to_the_bytes_of_their_rgb_copy(shape):
    from PIL import Image

    from backend.engines.base import DecodedImage
    from backend.minigpt.preprocess import resized_rgb

    rng = np.random.default_rng(shape[0])
    gray = rng.integers(0, 256, shape, dtype=np.uint8)
    want = np.asarray(Image.fromarray(gray).convert("RGB").resize((448, 448), resample=Image.Resampling.BICUBIC))
    got = resized_rgb(gray)
    assert got.shape == (448, 448, 3) and got.dtype == np.uint8
    assert np.array_equal(got, want)
    assert torch.equal(preprocess(gray), preprocess(np.repeat(gray[:, :, None], 3, axis=2)))
    deep = DecodedImage(rng.integers(0, 4096, shape, dtype=np.uint16), "PNG")  # 16-bit: mapped, then the gray path
    assert deep.pixels8().shape == shape and np.array_equal(resized_rgb(deep.pixels8()), resized_rgb(deep.rgb8()))
