"""A TINY MiniGPT-Med built offline, laid out exactly like the real files.

* ``eva_vit_g.pth``: BLIP-2 EVA key names, one block more than the model uses, a 16x16+1 ``pos_embed``,
  Conv/Linear weights fp16 and the rest fp32 (as the LAVIS file is believed to be).
* ``Llama-2-7b-chat-hf/``: config.json (torch_dtype float32), generation_config.json asking for sampling,
  model.safetensors, a SentencePiece ``tokenizer.model`` trained here, tokenizer_config.json with ``legacy: false``.
* ``minigptmed.pth``: ``{'model': ..., 'optimizer': ..., 'epoch': ...}`` with the original key names, LoRA keys
  without ``.default``, ``rotary_emb.inv_freq`` buffers and non-zero LoRA B.
* ``model_config.json`` for ``--model-config``.

The tiny LLM is briefly trained so that its greedy answers follow MiniGPT-Med's formats (a box for
``[detection]``/``[refer]``, short text otherwise); the files are cached per process in a temp dir.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

VISION = {"image_size": 448, "patch_size": 14, "width": 32, "depth": 2, "heads": 4, "mlp_dim": 64}
HIDDEN, LAYERS, HEADS, INTER = 64, 2, 4, 128
LORA_R, LORA_ALPHA = 64, 16
CKPT_GRID = 16  # pos_embed of the 224-px EVA checkpoint

# what the trained tiny model answers (instruction -> answer)
ANSWERS = {
    "Describe this image in detail": "the lungs are clear. no acute findings.",
    "[vqa] is there a mass?": "yes",
    "[detection] tumor": "<p>tumor</p> {<10><20><30><40>}",
    "[detection] pneumonia": "<p>pneumonia</p> {<50><10><90><60>}<delim>{<5><5><25><35>}",
    "[refer] nodule": "<p>nodule</p> {<60><60><80><90>}",
    "[identify] what object is in this location {<25><25><50><50>}": "a small nodule",
}

CORPUS = [
    "<s>[INST] <Img></Img> Describe this image in detail [/INST]",
    "[vqa] [detection] [refer] [identify] [grounding]",
    "what object is in this location",
    "<p>tumor</p> {<10><20><30><40>}<delim>{<5><5><25><35>}",
    "<p>pneumonia</p> <p>nodule</p> the lungs are clear. no acute findings. a small nodule yes no",
    "is there a mass? where is the tumor? the heart size is normal. there is a right lower lobe opacity.",
    "0 1 2 3 4 5 6 7 8 9 10 20 25 30 35 40 50 60 70 80 90 100 $$ pneumothorax effusion consolidation",
    "The CT scan shows a well defined hypodense lesion in the liver. MRI brain with contrast.",
]


@dataclass
class TinyFiles:
    root: Path
    eva: Path
    llama: Path
    checkpoint: Path
    model_config: Path

    def args(self) -> list[str]:
        return [
            "--eva",
            str(self.eva),
            "--llama",
            str(self.llama),
            "--checkpoint",
            str(self.checkpoint),
            "--model-config",
            str(self.model_config),
        ]


def _train_tokenizer(folder: Path, vocab_size: int | None = None) -> None:
    """The tests' SentencePiece model (about 420 pieces), or exactly ``vocab_size`` pieces (the benchmarks' real-size
    vocabulary of 32000, trained on the corpus plus random words in about 6 s on 2 cores)."""
    import io
    import random

    import sentencepiece as spm

    lines = CORPUS * 20
    if vocab_size:
        rng = random.Random(0)
        abc = "abcdefghijklmnopqrstuvwxyz"
        words = (
            " ".join("".join(rng.choice(abc) for _ in range(rng.randint(2, 9))) for _ in range(12))
            for _ in range(60000)
        )
        lines += list(words)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size or 420,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=["$$"],
        character_coverage=1.0,
        add_dummy_prefix=True,
        minloglevel=2,
        hard_vocab_limit=vocab_size is not None,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "legacy": False,
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": None,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 1000000000000000019884624838656,
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )


def _eva_state(gen) -> dict:
    import torch

    w, mlp, n = VISION["width"], VISION["mlp_dim"], VISION["depth"] + 1  # one block more, as EVA-CLIP-g has 40
    p = VISION["patch_size"]

    def r(*shape, std=0.05, half=False):
        t = torch.randn(*shape, generator=gen) * std
        return t.half() if half else t

    sd = {
        "cls_token": r(1, 1, w, std=0.5),
        "pos_embed": r(1, CKPT_GRID * CKPT_GRID + 1, w, std=0.5),
        "patch_embed.proj.weight": r(w, 3, p, p, std=0.1, half=True),
        "patch_embed.proj.bias": r(w, half=True),
    }
    for i in range(n):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": 1 + r(w),
                b + "norm1.bias": r(w),
                b + "attn.q_bias": r(w),
                b + "attn.v_bias": r(w),
                b + "attn.qkv.weight": r(3 * w, w, std=0.2, half=True),
                b + "attn.proj.weight": r(w, w, std=0.2, half=True),
                b + "attn.proj.bias": r(w, half=True),
                b + "norm2.weight": 1 + r(w),
                b + "norm2.bias": r(w),
                b + "mlp.fc1.weight": r(mlp, w, std=0.2, half=True),
                b + "mlp.fc1.bias": r(mlp, half=True),
                b + "mlp.fc2.weight": r(w, mlp, std=0.2, half=True),
                b + "mlp.fc2.bias": r(w, half=True),
            }
        )
    return sd


def _training_images():
    """Gray slices of several kinds, so that answers do not hinge on one picture."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for k in range(2):
        a = np.full((96, 128), 40 + 60 * k, np.uint8)
        a[20 + 20 * k : 50 + 20 * k, 30:70] = 200
        out.append(np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8))
    out.append(rng.integers(0, 256, (64, 64), dtype=np.uint8))
    out.append(np.tile(np.linspace(0, 255, 200, dtype=np.float32), (150, 1)).astype(np.uint8))
    return out


def _train(llm, proj, encode, tok, steps: int, gen) -> None:
    """Teach the tiny model the answer formats (full fine-tune of LLM + projector; the LoRA is added later)."""
    import torch

    from backend.minigpt.tokenization import build_prompt

    imgs = [encode(a) for a in _training_images()]
    samples = []
    for instr, ans in ANSWERS.items():
        segs = tok.prompt_segments(build_prompt(instr))
        target = [*tok.sp.encode(ans), tok.eos_id]
        samples.append((segs, target))
    params = list(llm.parameters()) + list(proj.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    emb = llm.get_input_embeddings()
    rows = [(img, segs, target) for img in imgs for segs, target in samples]
    width = max(len(s[0]) + img.shape[0] + len(s[1]) + len(t) for img, s, t in rows)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (img, segs, target) in enumerate(rows):  # right padding: the loss only sees the answers
        start = len(segs[0]) + img.shape[0] + len(segs[1]) - 1
        labels[r, start : start + len(target)] = torch.tensor(target)
        mask[r, : start + len(target)] = 1
    for _ in range(steps):
        opt.zero_grad()
        xs = []
        for img, segs, target in rows:
            x = torch.cat([emb(torch.tensor(segs[0])), proj(img), emb(torch.tensor(segs[1] + target[:-1]))])
            xs.append(torch.cat([x, x.new_zeros(width - x.shape[0], x.shape[1])]))
        logits = llm(inputs_embeds=torch.stack(xs), attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()


def build_tiny(root: Path, train_steps: int = 120) -> TinyFiles:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from backend.minigpt.config import MiniGPTMedConfig
    from backend.minigpt.eva_vit import EvaViT, interpolate_pos_embed
    from backend.minigpt.model import LnVision
    from backend.minigpt.preprocess import preprocess
    from backend.minigpt.tokenization import MiniGPTTokenizer

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    llama = root / "Llama-2-7b-chat-hf"
    llama.mkdir(exist_ok=True)
    _train_tokenizer(llama)
    tok = MiniGPTTokenizer(llama)
    cfg_json = {"vision": VISION, "llm_hidden_size": HIDDEN}
    (root / "model_config.json").write_text(json.dumps(cfg_json))
    cfg = MiniGPTMedConfig.from_dict(cfg_json)

    eva_sd = _eva_state(gen)
    torch.save(eva_sd, root / "eva_vit_g.pth")
    vit = EvaViT(cfg.vision)
    vit.load_state_dict(
        {
            **{k: v.float() for k, v in eva_sd.items() if not k.startswith(f"blocks.{VISION['depth']}.")},
            "pos_embed": interpolate_pos_embed(eva_sd["pos_embed"], cfg.vision.grid),
        }
    )
    ln = LnVision(VISION["width"], eps=1e-5)

    def encode(a):
        with torch.no_grad():
            f = ln(vit(preprocess(a)[None]))[:, 1:, :]
        return f.reshape(-1, cfg.proj_in)

    lcfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    llm = LlamaForCausalLM(lcfg)
    proj = torch.nn.Linear(cfg.proj_in, HIDDEN)
    if train_steps:
        _train(llm, proj, encode, tok, train_steps, gen)
    llm.eval()
    llm.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, do_sample=True, temperature=0.6, top_p=0.9, max_length=4096, pad_token_id=0
    )
    llm.save_pretrained(str(llama), safe_serialization=True)
    cj = json.loads((llama / "config.json").read_text())
    cj["torch_dtype"] = "float32"
    (llama / "config.json").write_text(json.dumps(cj, indent=2))

    # the MiniGPT-Med checkpoint: LoRA A/B such that the merged model equals the trained weights plus a small
    # non-zero delta (LoRA matters, but the trained answers survive)
    model = {"llama_proj.weight": proj.weight.detach().clone(), "llama_proj.bias": proj.bias.detach().clone()}
    pre = "llama_model.base_model.model.model.layers."
    head_dim = HIDDEN // HEADS
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(LAYERS):
        for m in ("q_proj", "v_proj"):
            model[f"{pre}{i}.self_attn.{m}.lora_A.weight"] = torch.randn(LORA_R, HIDDEN, generator=gen) * 0.05
            model[f"{pre}{i}.self_attn.{m}.lora_B.weight"] = torch.randn(HIDDEN, LORA_R, generator=gen) * 0.05
        model[f"{pre}{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
        "param_groups": [{"lr": 1e-5, "params": [0]}],
    }
    torch.save(
        {
            "model": model,
            "optimizer": optimizer,
            "epoch": 4,
            "scaler": None,
            "config": {"model": {"arch": "minigpt_v2", "lora_r": LORA_R, "lora_alpha": LORA_ALPHA}},
        },
        root / "minigptmed.pth",
    )
    return TinyFiles(root, root / "eva_vit_g.pth", llama, root / "minigptmed.pth", root / "model_config.json")


_CACHE: dict[str, TinyFiles] = {}


def _files(root: Path) -> TinyFiles:
    return TinyFiles(
        root, root / "eva_vit_g.pth", root / "Llama-2-7b-chat-hf", root / "minigptmed.pth", root / "model_config.json"
    )


def tiny_files() -> TinyFiles:
    """Built once and cached in the temp dir under a hash of this file and the model code that trains it
    ($MINIGPT_TINY_DIR overrides the location)."""
    if "tiny" in _CACHE:
        return _CACHE["tiny"]
    import hashlib
    import shutil

    here = Path(__file__).resolve()
    h = hashlib.sha1(here.read_bytes())
    for name in ("eva_vit.py", "tokenization.py", "preprocess.py", "model.py"):
        h.update((here.parents[1] / "backend" / "minigpt" / name).read_bytes())
    d = os.environ.get("MINIGPT_TINY_DIR") or os.path.join(tempfile.gettempdir(), f"minigpt-tiny-{h.hexdigest()[:12]}")
    root = Path(d)
    if not (root / "DONE").is_file():
        tmp = Path(tempfile.mkdtemp(prefix="minigpt-tiny-build-", dir=root.parent if root.parent.exists() else None))
        build_tiny(tmp)
        (tmp / "DONE").write_text("ok")
        shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    _CACHE["tiny"] = _files(root)
    return _CACHE["tiny"]
