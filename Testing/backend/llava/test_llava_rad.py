"""LLaVA-Rad: the v1 conversation against an independent construction, the vision path against a hand-written timm
ViT forward, the LoRA merge against peft's own, strict loading of the authors' files, and the CLI over HTTP."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from llava_fixtures import LORA_ALPHA, LORA_R, SCRIPT_ANSWER, TOWER, tiny_llava_rad

from backend.llava.config import LlavaConfigError, read_config
from backend.llava.preprocess import resize_crop
from backend.llava.template import build_prompt, postprocess, prompt_chunks, report_question
from backend.llava.weights import load_llava_rad
from backend.minigpt.tokenization import MiniGPTTokenizer
from backend.minigpt.weights import LoadOptions, WeightsError


@pytest.fixture(scope="module")
def files():
    return tiny_llava_rad()


@pytest.fixture(scope="module")
def loaded(files):
    cfg = read_config(files.model, files.model_config)
    model, report = load_llava_rad(files.model, files.llama, cfg, LoadOptions())
    return model, report, cfg, MiniGPTTokenizer(files.llama)


def _v1_prompt(query: str) -> str:
    """conv_vicuna_v1.get_prompt() after model_mimic_cxr.py's two append_message calls, rebuilt by hand."""
    system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    return system + " " + "USER" + ": " + "<image>\n" + query + " " + "ASSISTANT" + ":"


def _tokenizer_image_token(tok, prompt: str) -> list[int]:
    """llava/mm_utils.py's tokenizer_image_token with a transformers LlamaTokenizer, rebuilt by hand (-200 = image)."""
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for i, c in enumerate(chunks):
        if i:
            ids.append(-200)
        ids.extend(c[1:])
    return ids


def test_v1_template_token_ids_match_tokenizer_image_token(files, loaded):
    from transformers import LlamaTokenizer

    _m, _r, _c, tok = loaded
    questions = (report_question(), report_question("cough\nand fever"), "Is there a pleural effusion?")
    assert report_question() == "Provide a description of the findings in the radiology image."
    assert report_question("cough\nand fever").endswith("given the following indication: cough and fever")
    for legacy in (True, False):
        ref_tok = LlamaTokenizer.from_pretrained(str(files.llama), legacy=legacy)
        for q in questions:
            assert build_prompt(f"<image> {q} ") == _v1_prompt(q)  # the eval strips a literal <image> and spaces
            chunks = prompt_chunks(tok.sp, build_prompt(q), tok.bos_id)
            ours = [*chunks[0], -200, *chunks[1]]
            assert ours == _tokenizer_image_token(ref_tok, _v1_prompt(q)), (legacy, q)
            assert ours.count(1) == 1 and ours[0] == 1


def test_answer_postprocessing():
    assert postprocess("  The lungs are clear.</s> ") == "The lungs are clear."
    assert postprocess("No effusion. ") == "No effusion."


def _timm_reference(sd: dict, pixels: torch.Tensor, blocks: int) -> torch.Tensor:
    """timm VisionTransformer up to ``blocks`` blocks, written out from the checkpoint's tensors."""
    f = torch.nn.functional
    p, w, heads = TOWER["patch_size"], TOWER["width"], TOWER["heads"]
    g = lambda k: sd["module.visual.trunk." + k]  # noqa: E731
    x = f.conv2d(pixels, g("patch_embed.proj.weight"), g("patch_embed.proj.bias"), stride=p)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([g("cls_token").expand(x.shape[0], -1, -1), x], 1) + g("pos_embed")
    for i in range(blocks):
        b = lambda k, i=i: g(f"blocks.{i}.{k}")  # noqa: E731
        h = f.layer_norm(x, (w,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        qkv = f.linear(h, b("attn.qkv.weight"), b("attn.qkv.bias"))
        n = x.shape[1]
        q, k, v = qkv.reshape(x.shape[0], n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (w // heads) ** 0.5, -1) @ v
        att = f.linear(att.transpose(1, 2).reshape(x.shape[0], n, w), b("attn.proj.weight"), b("attn.proj.bias"))
        x = x + att * b("ls1.gamma")
        h = f.layer_norm(x, (w,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        h = f.linear(
            f.gelu(f.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias"))), b("mlp.fc2.weight"), b("mlp.fc2.bias")
        )
        x = x + h * b("ls2.gamma")
    return x


def test_vision_path_is_the_second_to_last_block_without_cls_then_the_mlp2x_gelu_projector(files, loaded):
    model, _r, cfg, _t = loaded
    sd = torch.load(files.model / "biomedclipcxr_518_checkpoint.pt", weights_only=True)["state_dict"]
    proj = torch.load(files.model / "non_lora_trainables.bin", weights_only=True)
    pixels = torch.randn(2, 3, TOWER["image_size"], TOWER["image_size"], generator=torch.Generator().manual_seed(1))
    feats = _timm_reference(sd, pixels, TOWER["depth"] - 1)[:, 1:]  # hidden_states[-2], CLS dropped
    pk = "base_model.model.model.mm_projector."
    f = torch.nn.functional
    want = f.linear(
        f.gelu(f.linear(feats, proj[pk + "0.weight"], proj[pk + "0.bias"])), proj[pk + "2.weight"], proj[pk + "2.bias"]
    )
    got = model.encode_images(pixels)
    assert got.shape == (2, (TOWER["image_size"] // TOWER["patch_size"]) ** 2, 64) == (2, cfg.image_tokens, 64)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_lora_merge_equals_peft_merge_and_unload(files, loaded):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model, report, _c, _t = loaded
    assert report.loaded["lora"] == 2 * 7 * 2 and report.lora == "merged"
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(files.llama)), str(files.model))
    ref = ref.merge_and_unload().eval()
    ac = json.loads((files.model / "adapter_config.json").read_text())
    assert (ac["r"], ac["lora_alpha"]) == (LORA_R, LORA_ALPHA)
    ids = torch.tensor([[1, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model.llm(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
        base = LlamaForCausalLM.from_pretrained(str(files.llama)).eval()
        assert (base(ids).logits - ref(ids).logits).abs().max() > 1e-2  # the LoRA does change the model


def test_preprocess_resizes_the_short_side_and_crops_the_centre():
    from PIL import Image

    rng = np.random.default_rng(3)
    for h, w in ((160, 90), (120, 200)):  # portrait, landscape
        img = rng.integers(0, 256, (h, w), dtype=np.uint8)
        out, (left, top, nw, nh) = resize_crop(img, 32)
        short, long_ = min(h, w), max(h, w)
        want_long = int(32 * long_ / short)
        assert (nw, nh) == ((32, want_long) if w < h else (want_long, 32))
        full = np.asarray(Image.fromarray(img).convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC))
        off = int(round((want_long - 32) / 2))
        want = full[off : off + 32] if w < h else full[:, off : off + 32]
        assert out.shape == (32, 32, 3) and np.array_equal(out, want)
        assert (top, left) == ((off, 0) if w < h else (0, off))


def test_the_tower_config_names_the_timm_trunk():
    """Without --model-config the open_clip config's timm name and image size build the trunk (the real layout)."""
    from backend.llava.config import TIMM_TRUNKS

    t = TIMM_TRUNKS["vit_base_patch14_dinov2"]
    assert (t.width, t.depth, t.heads, t.patch_size, t.layer_scale) == (768, 12, 12, 14, True)


def _copy(files, tmp_path):
    model = tmp_path / "llava-rad"
    shutil.copytree(files.model, model)
    return model


def test_wrong_or_damaged_files_fail_with_the_file_and_tensor_named(files, tmp_path):
    def load(model=None, llama=None, model_config=files.model_config):
        cfg = read_config(model or files.model, model_config)
        return load_llava_rad(model or files.model, llama or files.llama, cfg, LoadOptions())

    # the real tower config names a 768-wide trunk: without --model-config the tiny config.json disagrees
    with pytest.raises(LlavaConfigError, match=r"mm_hidden_size 32 but the tower biomedclipcxr_518\.json is 768 wide"):
        load(model_config=None)
    # the base LLM passed as --model
    with pytest.raises(LlavaConfigError, match="no mm_vision_tower: not a LLaVA config"):
        load(model=files.llama)
    m = _copy(files, tmp_path / "a")
    oc = json.loads((m / "biomedclipcxr_518.json").read_text())
    oc["vision_cfg"]["timm_model_name"] = "convnext_base"
    (m / "biomedclipcxr_518.json").write_text(json.dumps(oc))
    with pytest.raises(LlavaConfigError, match="timm_model_name 'convnext_base' is not a trunk we can build"):
        load(model=m, model_config=None)
    # the projector file given as the tower checkpoint
    m = _copy(files, tmp_path / "b")
    shutil.copy(m / "non_lora_trainables.bin", m / "biomedclipcxr_518_checkpoint.pt")
    with pytest.raises(WeightsError, match=r"biomedclipcxr_518_checkpoint.pt: no visual.trunk.\* tensors"):
        load(model=m)
    # a tower tensor missing / a projector tensor mis-shaped / an unknown LoRA tensor
    m = _copy(files, tmp_path / "c")
    ck = torch.load(m / "biomedclipcxr_518_checkpoint.pt", weights_only=True)
    del ck["state_dict"]["module.visual.trunk.blocks.2.ls2.gamma"]
    torch.save(ck, m / "biomedclipcxr_518_checkpoint.pt")
    with pytest.raises(WeightsError, match=r"missing vision tower tensors: visual.trunk.blocks.2.ls2.gamma"):
        load(model=m)
    m = _copy(files, tmp_path / "d")
    pr = torch.load(m / "non_lora_trainables.bin", weights_only=True)
    pr["base_model.model.model.mm_projector.2.weight"] = torch.zeros(64, 32)
    torch.save(pr, m / "non_lora_trainables.bin")
    with pytest.raises(WeightsError, match=r"model.mm_projector.2.weight has shape \(64, 32\), expected \(64, 64\)"):
        load(model=m)
    m = _copy(files, tmp_path / "e")
    lo = torch.load(m / "adapter_model.bin", weights_only=True)
    lo["base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"] = torch.zeros(LORA_R, 64)
    torch.save(lo, m / "adapter_model.bin")
    with pytest.raises(WeightsError, match=r"unexpected keys for a LoRA over 2 LLaMA layers: .*layers\.5\."):
        load(model=m)
    # a base LLM other than the one the LoRA was trained on (its config disagrees with LLaVA-Rad's config.json)
    m = _copy(files, tmp_path / "f")
    c = json.loads((m / "config.json").read_text())
    c["num_hidden_layers"] = 3
    (m / "config.json").write_text(json.dumps(c))
    with pytest.raises(WeightsError, match=r"num_hidden_layers 2 but .*config\.json says 3: --llama must be the base"):
        load(model=m)


def test_served_by_the_cli_report_and_vqa_over_http(files):
    """``python -m backend.cli serve --engine llava --family llava_rad``: report and vqa answer, boxes do not."""
    import requests
    from backend_process import BackendProcess
    from conftest import b64, blob_image
    from MiniGPTMedSlicerLib.png import encode_png

    with BackendProcess("--engine", "llava", "--family", "llava_rad", "--device", "cpu", *files.args()) as proc:
        health = requests.get(f"{proc.url}/health", timeout=10).json()
        assert health["engine"] == "llava" and set(health["tasks"]) == {"report", "vqa"}
        png = b64(encode_png(blob_image(size=96)[:, :64]))
        for body in ({"task": "report"}, {"task": "vqa", "question": "Is there a pleural effusion?"}):
            r = requests.post(f"{proc.url}/v1/analyze", json={**body, "image": png, "max_new_tokens": 160}, timeout=120)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["engine"] == "llava" and out["text"] == SCRIPT_ANSWER and out["findings"] == []
            assert out["warnings"] == []  # stopped at EOS, not at the token limit
        from MiniGPTMedSlicerLib.sse import SseParser

        r = requests.post(
            f"{proc.url}/v1/analyze", json={"task": "report", "image": png, "stream": True}, stream=True, timeout=120
        )
        parser, events = SseParser(), []
        for chunk in r.iter_content(chunk_size=None):
            events += parser.feed(chunk)
        deltas = [e.json()["text"] for e in events if e.event == "delta"]
        assert len(deltas) >= 3 and "".join(deltas) == SCRIPT_ANSWER == events[-1].json()["text"]
        r = requests.post(f"{proc.url}/v1/analyze", json={"task": "detect", "image": png}, timeout=60)
        assert r.status_code == 501 and "supports: report, vqa" in r.json()["error"]["message"]
