"""A TINY XrayGPT built offline in its authors' file layout (mbzuai-oryx/XrayGPT README "Setup"):

* ``eva_vit_g.pth``: BLIP-2 EVA key names (MiniGPT-Med's tiny EVA: one block more than used, 16x16+1 positions,
  which is exactly the 224-px grid XrayGPT runs at);
* ``blip2_pretrained_flant5xxl.pth``: ``{'model': ...}`` with LAVIS names (``Qformer.bert.encoder.layer.N.attention
  .self.query.weight`` ...), ``query_tokens``, ``ln_vision.*``, and the keys the original drops (text FFN,
  ``position_ids``, ``t5_proj``);
* ``Vicuna_Radiology_fp16/``: a tiny LLaMA with a SentencePiece ``tokenizer.model``; its ``generation_config.json``
  carries a transformers ``sequence_bias`` that scripts the greedy answer (``SCRIPT``: an answer, the ``###`` stop
  word, then text the original cuts off);
* ``xraygpt.pth``: ``{'model': {llama_proj.*, position_ids, rotary inv_freq}, 'optimizer', 'epoch', ...}``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

VISION = {"width": 32, "depth": 2, "heads": 4, "mlp_dim": 64}
QFORMER = {"hidden_size": 32, "num_layers": 3, "heads": 2, "intermediate_size": 48, "num_query_tokens": 4}
HIDDEN, LAYERS, HEADS, INTER = 64, 2, 4, 128
SCRIPT_ANSWER = "The heart size is normal. The lungs are clear."
SCRIPT = SCRIPT_ANSWER + "### Patient: thank you"

CORPUS = [
    "You are an experienced Doctor, give the following medical scan: <Img>ImageContent</Img>. "
    "You will be able to see the medical scan once I provide it to you. Please answer my questions.",
    "###Patient: <Img></Img> Describe the given chest x-ray image in detail.###Doctor:",
    "### Patient: Doctor: ### ## # Is there a pleural effusion? What are the key findings? ### ###",
    "a###b ### c###d ### e###f",
    "The heart size is normal. The lungs are clear. thank you ChatDoctor no effusion yes",
]


@dataclass
class XrayFiles:
    root: Path
    eva: Path
    qformer: Path
    llama: Path
    checkpoint: Path
    model_config: Path

    def args(self) -> list[str]:
        return [
            "--eva",
            str(self.eva),
            "--qformer",
            str(self.qformer),
            "--llama",
            str(self.llama),
            "--checkpoint",
            str(self.checkpoint),
            "--model-config",
            str(self.model_config),
        ]


def _tokenizer(folder: Path) -> None:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 30),
        model_writer=buf,
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        add_dummy_prefix=True,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "clean_up_tokenization_spaces": False,
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )


def lavis_qformer_state(gen) -> dict:
    """A random Q-Former state dict under LAVIS's names (built from the LAVIS layout, not from our key map)."""
    import torch

    h, inter, vis = QFORMER["hidden_size"], QFORMER["intermediate_size"], VISION["width"]

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    sd = {
        "query_tokens": r(1, QFORMER["num_query_tokens"], h, std=0.5),
        "ln_vision.weight": 1 + r(vis, std=0.1),
        "ln_vision.bias": r(vis, std=0.1),
        "Qformer.bert.embeddings.LayerNorm.weight": 1 + r(h, std=0.1),
        "Qformer.bert.embeddings.LayerNorm.bias": r(h, std=0.1),
        "Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
        "t5_proj.weight": r(8, h),
        "t5_proj.bias": r(8),
    }
    for i in range(QFORMER["num_layers"]):
        p = f"Qformer.bert.encoder.layer.{i}."
        kinds = ["attention"] + (["crossattention"] if i % 2 == 0 else [])
        for kind in kinds:
            kv_in = vis if kind == "crossattention" else h
            for n, fan_in in (("query", h), ("key", kv_in), ("value", kv_in)):
                sd[f"{p}{kind}.self.{n}.weight"] = r(h, fan_in)
                sd[f"{p}{kind}.self.{n}.bias"] = r(h, std=0.05)
            sd[f"{p}{kind}.output.dense.weight"] = r(h, h)
            sd[f"{p}{kind}.output.dense.bias"] = r(h, std=0.05)
            sd[f"{p}{kind}.output.LayerNorm.weight"] = 1 + r(h, std=0.1)
            sd[f"{p}{kind}.output.LayerNorm.bias"] = r(h, std=0.05)
        for ffn in ("", "_query"):  # the text FFN ("") is dropped by the original; the query FFN is used
            sd[f"{p}intermediate{ffn}.dense.weight"] = r(inter, h)
            sd[f"{p}intermediate{ffn}.dense.bias"] = r(inter, std=0.05)
            sd[f"{p}output{ffn}.dense.weight"] = r(h, inter)
            sd[f"{p}output{ffn}.dense.bias"] = r(h, std=0.05)
            sd[f"{p}output{ffn}.LayerNorm.weight"] = 1 + r(h, std=0.1)
            sd[f"{p}output{ffn}.LayerNorm.bias"] = r(h, std=0.05)
    return sd


def build_tiny(root: Path) -> XrayFiles:
    import torch
    from minigpt_fixtures import CKPT_GRID, _eva_state
    from scripted_answers import script_bias
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from backend.minigpt.tokenization import MiniGPTTokenizer

    assert 224 // 14 == CKPT_GRID  # XrayGPT's grid is the checkpoint's: no interpolation
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(4321)
    torch.manual_seed(4321)
    llama = root / "Vicuna_Radiology_fp16"
    llama.mkdir(exist_ok=True)
    _tokenizer(llama)
    tok = MiniGPTTokenizer(llama)
    (root / "model_config.json").write_text(
        json.dumps({"vision": VISION, "qformer": QFORMER, "llm_hidden_size": HIDDEN})
    )
    eva = _eva_state(gen)  # MiniGPT-Med's tiny EVA has the same widths (asserted in the tests)
    torch.save(eva, root / "eva_vit_g.pth")
    torch.save({"model": lavis_qformer_state(gen)}, root / "blip2_pretrained_flant5xxl.pth")

    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    ).eval()
    llm.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, sequence_bias=script_bias(tok.encode(SCRIPT, add_bos=False), tok.eos_id)
    )
    llm.save_pretrained(str(llama), safe_serialization=True)
    head_dim = HIDDEN // HEADS
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    model = {
        "llama_proj.weight": torch.randn(HIDDEN, QFORMER["hidden_size"], generator=gen) * 0.2,
        "llama_proj.bias": torch.randn(HIDDEN, generator=gen) * 0.05,
        "Qformer.bert.embeddings.position_ids": torch.arange(512)[None],
        **{f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(LAYERS)},
    }
    torch.save(
        {"model": model, "optimizer": {"state": {}, "param_groups": []}, "epoch": 2, "scaler": None},
        root / "xraygpt.pth",
    )
    return _files(root)


def _files(root: Path) -> XrayFiles:
    return XrayFiles(
        root,
        root / "eva_vit_g.pth",
        root / "blip2_pretrained_flant5xxl.pth",
        root / "Vicuna_Radiology_fp16",
        root / "xraygpt.pth",
        root / "model_config.json",
    )


_CACHE: dict[str, XrayFiles] = {}


def tiny_xraygpt() -> XrayFiles:
    """Built once per process in a temp dir."""
    if "x" not in _CACHE:
        _CACHE["x"] = build_tiny(Path(tempfile.mkdtemp(prefix="xraygpt-tiny-")))
    return _CACHE["x"]
