"""BiMediX2 (``--engine llava --family bimedix2``): the conv_llama3 prompt against an independent construction of the
authors' template (tokenised with the ``tokenizers`` library itself), the key map against the modules the folder was
written from, the pad-to-square preprocessing against transformers' CLIPImageProcessor, strict loading, and the CLI
over HTTP with an Arabic question and a streamed bilingual answer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from bimedix2_fixtures import SCRIPT_ANSWER, VISION, tiny_bimedix2

from backend.llava.bimedix2_config import read_bimedix2_config
from backend.llava.bimedix2_template import build_prompt, postprocess, prompt_chunks, stop_ids
from backend.llava.bimedix2_weights import load_bimedix2
from backend.llava.clip_preprocess import preprocess
from backend.llava.config import LlavaConfigError
from backend.minigpt.weights import LoadOptions, WeightsError

ARABIC_Q = "هل يوجد انصباب جنبي؟"


@pytest.fixture(scope="module")
def files():
    return tiny_bimedix2()


@pytest.fixture(scope="module")
def tok(files):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(files.model), local_files_only=True)


def _mpt_prompt(turns: list[tuple[str, str | None]]) -> str:
    """bimedix_inference.py's conv_llama3 (SeparatorStyle.MPT) after gen_answer's append_message calls, by hand."""
    system = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    user, assistant = (
        "<|start_header_id|>user<|end_header_id|>\n\n",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    ret = system + "<|eot_id|>"
    for role, msg in [m for q, a in turns for m in ((user, q), (assistant, a))]:
        ret += role + msg + "<|eot_id|>" if msg else role
    return ret


def _tokenizer_image_token(path, prompt: str) -> list[int]:
    """llava/mm_utils.py's tokenizer_image_token over the raw ``tokenizers`` Tokenizer of tokenizer.json (-200 =
    the image), rebuilt by hand."""
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(path / "tokenizer.json"))
    bos = t.token_to_id("<|begin_of_text|>")
    chunks = [t.encode(c).ids for c in prompt.split("<image>")]
    offset = 1 if chunks[0] and chunks[0][0] == bos else 0
    ids = [chunks[0][0]] if offset else []
    for i, c in enumerate(chunks):
        if i:
            ids.append(-200)
        ids.extend(c[offset:])
    return ids


def test_conv_llama3_token_ids_match_the_authors_template(files, tok):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(files.model / "tokenizer.json"))
    bos = raw.token_to_id("<|begin_of_text|>")
    cases = [
        ("Describe this medical image in detail and list the findings.", []),
        (ARABIC_Q, []),
        (
            "Is there a pleural effusion?",
            [("<image> What is shown? ", "The heart is normal."), ("And the lungs?", "Clear.")],
        ),
    ]
    for q, hist in cases:
        first = hist[0][0] if hist else q
        turns = [("<image>\n" + first.replace("<image>", "").strip(), hist[0][1] if hist else None)]
        turns += [(a.strip(), b) for a, b in hist[1:]] + ([(q, None)] if hist else [])
        assert build_prompt(q, hist) == _mpt_prompt(turns)
        chunks = prompt_chunks(tok, build_prompt(q, hist))
        ours = [*chunks[0], -200, *chunks[1]]
        assert ours == _tokenizer_image_token(files.model, _mpt_prompt(turns)), q
        # BOS twice (the tokenizer's and the one written in the system text), once per conversation; one image
        assert ours[:2] == [bos, bos] and ours.count(bos) == 2 and ours.count(-200) == 1
    # the Arabic question passes through unchanged: its bytes decode back from the ids
    assert ARABIC_Q in tok.decode(prompt_chunks(tok, build_prompt(ARABIC_Q))[1])


def test_stop_ids_and_answer_postprocessing(tok):
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    end = tok.convert_tokens_to_ids("<|end_of_text|>")
    assert stop_ids(tok, [end, eot]) == [end, eot]
    assert stop_ids(tok, end) == [end, eot]  # <|eot_id|> added (the MPT sep the authors stop on)
    assert postprocess("  القلب طبيعي.<|eot_id|> ") == "القلب طبيعي."


def test_key_map_gives_the_modules_the_folder_was_written_from(files):
    cfg = read_bimedix2_config(files.model, files.model_config)
    model, report = load_bimedix2(files.model, cfg, LoadOptions())
    assert report.loaded == {"llm": 21, "vision_tower": 55, "mm_projector": 4}
    ref = files.reference
    px = torch.randn(2, 3, VISION["image_size"], VISION["image_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref["projector"](ref["vision"](px, output_hidden_states=True).hidden_states[-2][:, 1:])
        got = model.encode_images(px)
        assert got.shape == (2, 16, 64) and torch.equal(got, want)  # layer -2 of 3, CLS dropped, mlp2x_gelu
        ids = torch.tensor([[0, 5, 9, 200, 4]])
        assert torch.equal(model.llm(ids).logits, ref["llm"](ids).logits)
    # --vision-tower: the tower read from the CLIP folder (as LLaVA's loader does), the shards' copy ignored
    cfg2 = read_bimedix2_config(files.model, None, files.clip)
    assert cfg2.vision["hidden_size"] == 32 and cfg2.image_size == 32 and cfg2.aspect == "pad"
    model2, report2 = load_bimedix2(files.model, cfg2, LoadOptions())
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(str(files.clip)).eval()
    with torch.no_grad():
        want2 = ref["projector"](clip(px, output_hidden_states=True).hidden_states[-2][:, 1:])
        assert torch.allclose(model2.encode_images(px), want2, atol=1e-6)
        assert not torch.allclose(want2, want, atol=1e-3)
    ign = report2.ignored["vision_tower"]
    assert "logit_scale" in ign and any(k.startswith("text_model.") for k in ign)
    assert any(k.endswith("model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight") for k in ign)


@pytest.mark.parametrize("shape", [(40, 24), (24, 56)])  # portrait and landscape (rows, cols)
def test_pad_to_square_then_the_clip_processor(shape):
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    # expand2square by hand: the image centred on a square of its longer side filled with int(mean * 255)
    h, w = shape
    side = max(h, w)
    sq = np.empty((side, side, 3), np.uint8)
    sq[:] = (122, 116, 104)
    top, left = (side - h) // 2, (side - w) // 2
    sq[top : top + h, left : left + w] = img
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    want = torch.as_tensor(proc(images=sq, return_tensors="np")["pixel_values"][0])
    got = preprocess(img, 32, mean, std, "pad")
    assert got.shape == (3, 32, 32) and torch.allclose(got, want, atol=1e-5)
    # the pad band is CLIP's mean colour, i.e. about 0 after normalisation (nothing of the slice is cropped)
    band = got[:, 0, :] if h < w else got[:, :, 0]
    assert band.abs().max() < 0.02  # int(mean * 255) truncates: (122 - 122.8) / 255 / 0.27
    # without "pad" the processor's centre crop cuts the longer side
    want_crop = torch.as_tensor(proc(images=img, return_tensors="np")["pixel_values"][0])
    assert torch.allclose(preprocess(img, 32, mean, std, None), want_crop, atol=1e-5)


def _copy(files, dst):
    shutil.copytree(files.model, dst)
    return dst


def _edit_json(path, **kv):
    d = json.loads(path.read_text())
    d.update(kv)
    path.write_text(json.dumps(d))


def test_wrong_or_damaged_files_fail_with_the_file_and_tensor_named(files, tmp_path):
    from safetensors.torch import load_file, save_file

    def load(model, model_config=files.model_config, tower=None):
        return load_bimedix2(model, read_bimedix2_config(model, model_config, tower), LoadOptions())

    # the real tower (CLIP-L/336, 1024 wide) against the tiny config.json
    with pytest.raises(
        LlavaConfigError, match=r"mm_hidden_size 32 but the tower openai/clip-vit-large-patch14-336 is 1024"
    ):
        load(files.model, model_config=None)
    # the CLIP folder given as the model, a LLaVA-Rad style config with an unknown tower, anyres
    with pytest.raises(LlavaConfigError, match="no mm_vision_tower: not a LLaVA"):
        load(files.clip)
    bad = tmp_path / "model_config.json"  # a --model-config whose vision lacks widths: named, not a KeyError
    bad.write_text(json.dumps({"vision": {"image_size": 336}}))
    with pytest.raises(LlavaConfigError, match=r"^--model-config: vision lacks hidden_size, num_hidden_layers$"):
        load(files.model, model_config=bad)
    m = _copy(files, tmp_path / "a")
    _edit_json(m / "config.json", mm_vision_tower="biomedclip_cxr_518")
    with pytest.raises(LlavaConfigError, match=r"'biomedclip_cxr_518' is not a tower we know .* pass --vision-tower"):
        load(m, model_config=None)
    _edit_json(m / "config.json", mm_vision_tower="openai/clip-vit-large-patch14-336", image_aspect_ratio="anyres")
    with pytest.raises(LlavaConfigError, match="image_aspect_ratio 'anyres' is not served"):
        load(m)
    # a shard missing, a projector tensor missing, a tower tensor mis-shaped, an unknown tensor
    m = _copy(files, tmp_path / "b")
    (m / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        WeightsError, match=r"names the shard model-00002-of-00002\.safetensors, which is not in the folder"
    ):
        load(m)
    m = _copy(files, tmp_path / "c")
    idx = json.loads((m / "model.safetensors.index.json").read_text())
    where = idx["weight_map"]["model.mm_projector.2.bias"]
    sd = load_file(str(m / where))
    del sd["model.mm_projector.2.bias"]
    save_file(sd, str(m / where))
    del idx["weight_map"]["model.mm_projector.2.bias"]
    (m / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(WeightsError, match=r"missing projector tensors: model.mm_projector.2.bias"):
        load(m)
    m = _copy(files, tmp_path / "d")
    key = "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    where = json.loads((m / "model.safetensors.index.json").read_text())["weight_map"][key]
    sd = load_file(str(m / where))
    sd[key] = torch.zeros(64, 16)
    save_file(sd, str(m / where))
    with pytest.raises(
        WeightsError, match=r"vision_model.encoder.layers.1.mlp.fc1.weight has shape \(64, 16\), expected \(64, 32\)"
    ):
        load(m)
    m = _copy(files, tmp_path / "e")
    first = "model-00001-of-00002.safetensors"
    sd = load_file(str(m / first))
    sd["model.extra_head.weight"] = torch.zeros(2)
    save_file(sd, str(m / first))
    idx = json.loads((m / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.extra_head.weight"] = first
    (m / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(WeightsError, match=r"unexpected model.extra_head.weight"):
        load(m)
    # shards without the tower: --vision-tower is asked for (and then serves)
    m = _copy(files, tmp_path / "f")
    idx = json.loads((m / "model.safetensors.index.json").read_text())
    for shard in {v for v in idx["weight_map"].values()}:
        sd = {k: v for k, v in load_file(str(m / shard)).items() if ".vision_tower." not in k}
        save_file(sd, str(m / shard))
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if ".vision_tower." not in k}
    (m / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(WeightsError, match=r"the shards hold no vision tower .* pass --vision-tower"):
        load(m)
    assert load(m, model_config=None, tower=files.clip)[1].loaded["vision_tower"] == 55


def _events(r):
    from MiniGPTMedSlicerLib.sse import SseParser

    parser, out = SseParser(), []
    for chunk in r.iter_content(chunk_size=None):
        out += parser.feed(chunk)
    return out


def test_served_by_the_cli_report_vqa_arabic_and_stream_over_http(files, tok):
    """``python -m backend.cli serve --engine llava --family bimedix2``: report and vqa (an Arabic question passes
    through unchanged, the bilingual answer comes back in UTF-8, streamed deltas never split a character), boxes 501."""
    import requests
    from backend_process import BackendProcess
    from conftest import b64, blob_image
    from MiniGPTMedSlicerLib.png import encode_png

    with BackendProcess("--engine", "llava", "--family", "bimedix2", "--device", "cpu", *files.args()) as proc:
        health = requests.get(f"{proc.url}/health", timeout=10).json()
        assert health["engine"] == "llava" and set(health["tasks"]) == {"report", "vqa"}
        assert health["model"].startswith("BiMediX2")
        png = b64(encode_png(blob_image(size=96)[:, :64]))
        for body in ({"task": "report"}, {"task": "vqa", "question": "Is there a pleural effusion?"}):
            r = requests.post(f"{proc.url}/v1/analyze", json={**body, "image": png, "max_new_tokens": 80}, timeout=120)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["engine"] == "llava" and out["text"] == SCRIPT_ANSWER and out["findings"] == []
            assert out["warnings"] == []  # stopped at <|eot_id|>, not at the token limit
        # the Arabic question: its tokens reach the model as the template writes them (prompt length counted here)
        body = {"task": "vqa", "question": ARABIC_Q, "image": png, "max_new_tokens": 80}
        r = requests.post(f"{proc.url}/v1/analyze", json=body, timeout=120)
        out = r.json()
        ids = _tokenizer_image_token(files.model, _mpt_prompt([("<image>\n" + ARABIC_Q, None)]))
        assert out["text"] == SCRIPT_ANSWER and "القلب طبيعي" in r.content.decode("utf-8")
        assert out["timings_ms"]["prompt_tokens"] == len(ids) - 1 + 16  # the image: 16 patch features
        events = _events(
            requests.post(f"{proc.url}/v1/analyze", json={**body, "stream": True}, stream=True, timeout=120)
        )
        deltas = [e.json()["text"] for e in events if e.event == "delta"]
        assert len(deltas) >= 5 and all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == SCRIPT_ANSWER == events[-1].json()["text"]
        # sampling (a request temperature: top_p 1.0, top_k 50) still follows the scripted answer's large bias
        r = requests.post(f"{proc.url}/v1/analyze", json={**body, "temperature": 0.7}, timeout=120)
        assert r.status_code == 200 and r.json()["text"] == SCRIPT_ANSWER
        # a follow-up with history, and the box tasks
        hist = [{"question": "What is shown?", "answer": SCRIPT_ANSWER}]
        r = requests.post(f"{proc.url}/v1/analyze", json={**body, "history": hist}, timeout=120)
        assert r.status_code == 200 and r.json()["timings_ms"]["prompt_tokens"] > out["timings_ms"]["prompt_tokens"]
        r = requests.post(f"{proc.url}/v1/analyze", json={"task": "detect", "image": png}, timeout=60)
        assert r.status_code == 501 and "supports: report, vqa" in r.json()["error"]["message"]


def test_converted_to_llava_hf_computes_the_same_and_the_hf_engine_serves_it(files, tok, tmp_path):
    """``convert --bimedix2``: transformers' own LlavaForConditionalGeneration + LlavaProcessor + the written
    conv_llama3 chat template give the same prompt ids, pixels and logits as the llava engine's path; the hf engine
    (``--family generic``) answers from the folder with the model's own template."""
    import requests
    from conftest import b64
    from MiniGPTMedSlicerLib.png import encode_png
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from backend.cli import main
    from backend.engines.hf import HFEngine
    from backend.prompt_embeds import splice_image
    from backend.server_thread import ServerThread
    from backend.settings import HFSettings

    out = tmp_path / "BiMediX2-8B-llava-hf"
    args = ["convert", "--bimedix2", str(files.model), "--model-config", str(files.model_config), "--out", str(out)]
    assert main([*args, "--dtype", "float32"]) == 0
    assert main([*args, "--dtype", "float32"]) == 2  # an existing --out: one line, nothing overwritten
    proc = AutoProcessor.from_pretrained(str(out), local_files_only=True)
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), local_files_only=True).eval()
    img = np.random.default_rng(1).integers(0, 256, (40, 24, 3), dtype=np.uint8)  # portrait: padded, not cropped
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ARABIC_Q}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=[Image.fromarray(img)], return_tensors="pt")
    ids, tid = enc["input_ids"][0].tolist(), hf.config.image_token_index
    assert ids.count(tid) == 16
    chunks = prompt_chunks(tok, build_prompt(ARABIC_Q))
    assert [i for k, i in enumerate(ids) if not (i == tid and ids[k - 1] == tid)] == [*chunks[0], tid, *chunks[1]]
    cfg = read_bimedix2_config(files.model, files.model_config)
    ours, _ = load_bimedix2(files.model, cfg, LoadOptions())
    px = preprocess(img, 32, cfg.mean, cfg.std, "pad")
    assert torch.allclose(px, enc["pixel_values"][0], atol=1e-6)
    with torch.no_grad():
        emb = splice_image(ours.embed_tokens, chunks, ours.encode_images(px[None])[0], torch.float32)
        assert torch.allclose(ours.llm(inputs_embeds=emb[None]).logits, hf(**enc).logits, atol=1e-5)
    engine = HFEngine(HFSettings(model=str(out), family="generic", device="cpu", dtype="float32"))
    with ServerThread(engine) as url:
        body = {"task": "vqa", "question": ARABIC_Q, "image": b64(encode_png(img)), "max_new_tokens": 60}
        r = requests.post(f"{url}/v1/analyze", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == SCRIPT_ANSWER


def test_auto_picks_the_llava_engine_for_the_llava_families(files):
    from backend.cli import build_parser, engine_settings
    from backend.engines import choose_engine

    for family, want in (("bimedix2", "llava"), ("llava_rad", "llava"), ("generic", "hf")):
        args = build_parser().parse_args(["serve", "--family", family, "--model", str(files.model)])
        assert choose_engine(engine_settings(args, {}))[0] == want, family
