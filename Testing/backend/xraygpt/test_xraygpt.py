"""XrayGPT: the demo's template against an independent construction, strict loading of the authors' four files,
the Q-Former key map against a hand-written LAVIS query path, and decoding's stop word."""

from __future__ import annotations

import math

import pytest
import torch
from xraygpt_fixtures import QFORMER, SCRIPT_ANSWER, VISION, lavis_qformer_state, tiny_xraygpt

from backend.minigpt.tokenization import MiniGPTTokenizer
from backend.minigpt.weights import LoadOptions, WeightsError
from backend.xraygpt.config import XrayGPTConfig
from backend.xraygpt.template import build_prompt, postprocess, stop_sequences
from backend.xraygpt.weights import load_original


@pytest.fixture(scope="module")
def files():
    return tiny_xraygpt()


@pytest.fixture(scope="module")
def loaded(files):
    cfg = XrayGPTConfig.from_json(files.model_config)
    model, report = load_original(files.eva, files.qformer, files.llama, files.checkpoint, cfg, LoadOptions())
    return model, report, MiniGPTTokenizer(files.llama)


def _demo_prompt(question: str) -> str:
    """conversation.py's CONV_VISION.get_prompt() after upload_img + ask + answer, rebuilt by hand."""
    system = (
        "You are an experienced Doctor, give the following medical scan: <Img>ImageContent</Img>. "
        "You will be able to see the medical scan once I provide it to you. Please answer my questions."
    )
    messages = [["Patient", "<Img><ImageHere></Img>"], ["Doctor", None]]
    messages[0][1] = " ".join([messages[0][1], question])  # Chat.ask joins the text to the image message
    ret = system + "###"
    for role, msg in messages:
        ret += f"{role}: {msg}###" if msg else f"{role}:"
    return ret


def test_template_token_ids_match_the_demo_with_the_legacy_slow_tokenizer(files, loaded):
    from transformers import AutoTokenizer

    _model, _report, tok = loaded
    legacy = AutoTokenizer.from_pretrained(str(files.llama), legacy=True)
    for q in ("Describe the given chest x-ray image in detail.", "Is there a pleural effusion?"):
        assert build_prompt(q) == _demo_prompt(q)
        text0, text1 = _demo_prompt(q).split("<ImageHere>")
        seg0, seg1 = tok.prompt_segments(build_prompt(q))
        assert seg0 == legacy(text0).input_ids and seg0[0] == 1 and seg0[1] != 1  # one BOS: no literal <s>
        assert seg1 == legacy(text1, add_special_tokens=False).input_ids and 1 not in seg1


def test_stop_words_are_both_spellings_of_the_separator(loaded):
    _model, _report, tok = loaded
    stops = stop_sequences(tok)
    assert [[tok.sp.id_to_piece(i) for i in s] for s in stops][:2] == [["▁###"], ["##", "#"]]  # LLaMA's two
    assert postprocess("Doctor: the heart is normal.### Patient: ok") == "the heart is normal."
    assert postprocess("ChatDoctor says the lungs are clear") == "XrayGPT says the lungs are clear"


def _ln(x, sd, p, eps=1e-12):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _attend(x, kv, sd, p, heads):
    def lin(t, n):
        return t @ sd[f"{p}.self.{n}.weight"].T + sd[f"{p}.self.{n}.bias"]

    b, n, h = x.shape
    d = h // heads
    q, k, v = (
        lin(t, n).reshape(b, -1, heads, d).transpose(1, 2) for t, n in ((x, "query"), (kv, "key"), (kv, "value"))
    )
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    ctx = (w @ v).transpose(1, 2).reshape(b, n, h)
    out = ctx @ sd[f"{p}.output.dense.weight"].T + sd[f"{p}.output.dense.bias"]
    return _ln(out + x, sd, f"{p}.output.LayerNorm")


def _lavis_query_path(sd: dict, image_feats: torch.Tensor) -> torch.Tensor:
    """LAVIS Qformer.py BertModel with query_embeds only: LayerNorm, then per layer self-attention, cross-attention
    in layers 0, 2, ... (cross_attention_freq 2), and the *_query FFN; written from the LAVIS names directly."""
    x = _ln(sd["query_tokens"].expand(image_feats.shape[0], -1, -1), sd, "Qformer.bert.embeddings.LayerNorm")
    for i in range(QFORMER["num_layers"]):
        p = f"Qformer.bert.encoder.layer.{i}"
        x = _attend(x, x, sd, f"{p}.attention", QFORMER["heads"])
        if i % 2 == 0:
            x = _attend(x, image_feats, sd, f"{p}.crossattention", QFORMER["heads"])
        h = torch.nn.functional.gelu(
            x @ sd[f"{p}.intermediate_query.dense.weight"].T + sd[f"{p}.intermediate_query.dense.bias"]
        )
        out = h @ sd[f"{p}.output_query.dense.weight"].T + sd[f"{p}.output_query.dense.bias"]
        x = _ln(out + x, sd, f"{p}.output_query.LayerNorm")
    return x


def test_qformer_key_map_reproduces_the_lavis_query_path(files, loaded):
    model, report, _tok = loaded
    sd = torch.load(files.qformer, weights_only=True)["model"]
    ckpt = torch.load(files.checkpoint, weights_only=True)["model"]
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vit = model.visual_encoder(pixels)
        assert vit.shape == (2, 1 + 16 * 16, VISION["width"])  # 224 px: CLS + 16x16, CLS kept for the Q-Former
        feats = _ln(vit, sd, "ln_vision", eps=1e-5)
        want = _lavis_query_path(sd, feats) @ ckpt["llama_proj.weight"].T + ckpt["llama_proj.bias"]
        got = model.encode_images(pixels)
    assert got.shape == (2, QFORMER["num_query_tokens"], 64)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # what the original drops is reported, not loaded: the text FFN, position ids, the T5 projection, rotary buffers
    assert any(".intermediate.dense." in k for k in report.ignored["qformer"])
    assert "t5_proj.weight" in report.ignored["qformer"] and len(report.ignored["checkpoint"]) == 3
    assert report.loaded["qformer"] == len(model.qformer.state_dict()) + 3  # + query_tokens + ln_vision w/b


def _write(tmp_path, name, sd):
    p = tmp_path / name
    torch.save({"model": sd}, p)
    return p


def test_wrong_or_damaged_files_fail_with_the_tensor_named(files, tmp_path):
    cfg = XrayGPTConfig.from_json(files.model_config)
    opts = LoadOptions()
    good = lavis_qformer_state(torch.Generator().manual_seed(1))

    def load(qformer=files.qformer, checkpoint=files.checkpoint, eva=files.eva):
        return load_original(eva, qformer, files.llama, checkpoint, cfg, opts)

    broken = {k: v for k, v in good.items() if k != "Qformer.bert.encoder.layer.2.crossattention.self.key.weight"}
    with pytest.raises(WeightsError, match=r"missing keys for the Q-Former.*layer\.2\.crossattention\.attention\.key"):
        load(qformer=_write(tmp_path, "q1.pth", broken))
    with pytest.raises(WeightsError, match=r"unexpected keys for the BLIP-2 Q-Former: Qformer\.bert\.extra\.weight"):
        load(qformer=_write(tmp_path, "q2.pth", {**good, "Qformer.bert.extra.weight": torch.zeros(1)}))
    wrong = dict(good, query_tokens=torch.zeros(1, 7, QFORMER["hidden_size"]))
    with pytest.raises(WeightsError, match=r"query_tokens has shape \(1, 7, 32\), expected \(1, 4, 32\)"):
        load(qformer=_write(tmp_path, "q3.pth", wrong))
    with pytest.raises(WeightsError, match=r"unexpected keys for the BLIP-2 Q-Former: blocks\..*no Q-Former"):
        load(qformer=files.eva)  # the EVA file passed as --qformer
    lora = {
        "llama_proj.weight": torch.zeros(64, 128),
        "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
    }
    with pytest.raises(WeightsError, match="MiniGPT-v2/MiniGPT-Med checkpoint"):
        load(checkpoint=_write(tmp_path, "c1.pth", lora))
    with pytest.raises(WeightsError, match=r"llama_proj\.weight has shape \(64, 31\), expected \(64, 32\)"):
        load(
            checkpoint=_write(
                tmp_path, "c2.pth", {"llama_proj.weight": torch.zeros(64, 31), "llama_proj.bias": torch.zeros(64)}
            )
        )
    with pytest.raises(WeightsError, match=r"missing keys in the XrayGPT checkpoint: llama_proj\.bias"):
        load(checkpoint=_write(tmp_path, "c3.pth", {"llama_proj.weight": torch.zeros(64, 32)}))
    with pytest.raises(WeightsError, match=r"--qformer: .* does not exist"):
        load(qformer=tmp_path / "nope.pth")


def test_generation_stops_at_the_separator(loaded):
    from backend.xraygpt.generate import generate

    model, _report, tok = loaded
    emb = model.embed_tokens(torch.tensor(tok.encode("hello", add_bos=True)))
    g = generate(model.llm, emb, 60, stop_sequences(tok), tok.eos_id)
    assert g.stopped == "stop_word"
    assert postprocess(tok.decode(g.ids)) == SCRIPT_ANSWER  # the scripted text after ### was never generated


def test_served_by_the_cli_report_and_vqa_over_http(files):
    """``python -m backend.cli serve --engine xraygpt`` with the four files: report and vqa answer, boxes do not."""
    import requests
    from backend_process import BackendProcess
    from conftest import b64, blob_image
    from MiniGPTMedSlicerLib.png import encode_png

    with BackendProcess("--engine", "xraygpt", "--device", "cpu", *files.args()) as proc:
        health = requests.get(f"{proc.url}/health", timeout=10).json()
        assert health["engine"] == "xraygpt" and set(health["tasks"]) == {"report", "vqa"}
        png = b64(encode_png(blob_image(size=96)[:, :80]))
        for body in ({"task": "report"}, {"task": "vqa", "question": "Is there a pleural effusion?"}):
            r = requests.post(f"{proc.url}/v1/analyze", json={**body, "image": png, "max_new_tokens": 40}, timeout=120)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["engine"] == "xraygpt" and out["text"] == SCRIPT_ANSWER and out["findings"] == []
            assert out["warnings"] == []  # stopped at '###', not at the token limit
        r = requests.post(f"{proc.url}/v1/analyze", json={"task": "detect", "image": png}, timeout=60)
        assert r.status_code == 501 and "supports: report, vqa" in r.json()["error"]["message"]


def test_convert_writes_a_safetensors_folder_that_loads_the_same_model(files, loaded, tmp_path, capsys):
    """``minigptmed-backend convert --qformer ...`` (the CLI's main, in process) -> a folder the engine serves with
    ``--converted``: the same image embeddings and the same answer as the original files; wrong folders fail naming
    what is wrong."""
    import numpy as np

    from backend.cli import main
    from backend.engines.base import AnalysisInput, DecodedImage, StopToken
    from backend.engines.xraygpt import XrayGPTEngine
    from backend.settings import XrayGPTSettings
    from backend.xraygpt.weights import load_converted

    out = tmp_path / "xraygpt-converted"
    argv = ["convert", *files.args(), "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} ")
    assert sorted(p.name for p in out.iterdir()) == ["llm", "vision.safetensors", "xraygpt_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder was renamed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "Traceback" not in err

    original, _report, _tok = loaded
    model, cfg, report = load_converted(out, LoadOptions())
    assert report.source == "converted" and cfg == original.cfg
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    assert torch.equal(model.encode_images(pixels), original.encode_images(pixels))
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        assert torch.equal(model.llm(ids).logits, original.llm(ids).logits)

    engine = XrayGPTEngine(XrayGPTSettings(converted=str(out), device="cpu"))
    engine.load()
    img = DecodedImage(np.full((60, 80), 90, np.uint8), "PNG")
    res = engine.analyze_batch([AnalysisInput(task="report", image=img, max_new_tokens=60)], StopToken())
    assert res[0].text == SCRIPT_ANSWER

    with pytest.raises(WeightsError, match=r"no xraygpt_config\.json: not an XrayGPT converted folder"):
        load_converted(files.llama, LoadOptions())
