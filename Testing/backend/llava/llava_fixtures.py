"""A TINY LLaVA-Rad built offline in its authors' file layout (microsoft/LLaVA-Rad @ 1fc4409, ``llava/model/builder.py``
with ``model_base`` and ``open_clip_encoder.py``):

* ``vicuna-7b-v1.5/``: the base LLM, a tiny LLaMA with a SentencePiece ``tokenizer.model``; its
  ``generation_config.json`` carries a transformers ``sequence_bias`` that scripts the greedy answer;
* ``llava-rad/``: ``config.json`` (LLaVA's ``LlavaConfig``: the LLaMA keys + ``mm_*`` keys as the training scripts
  set them, the tower config path being the training-tree path the HF layout does not have); the LoRA written by
  peft itself (``get_peft_model`` + ``save_pretrained``: ``adapter_config.json`` + ``adapter_model.bin``) over all
  seven linear layers of every block, as LLaVA's ``find_all_linear_names`` picks them; ``non_lora_trainables.bin``
  (``base_model.model.model.mm_projector.{0,2}.*``); ``biomedclipcxr_518.json`` (an open_clip model config) and
  ``biomedclipcxr_518_checkpoint.pt`` (an open_clip training checkpoint: ``{'epoch', 'state_dict':
  {'module.visual.trunk.*', 'module.visual.head.*', 'module.text.*', 'module.logit_scale'}}``).

The tower's dimensions are tiny, so ``model_config.json`` (``--model-config``) gives them instead of the timm name.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

TOWER = {"width": 32, "depth": 3, "heads": 2, "patch_size": 8, "image_size": 32, "layer_scale": True}
HIDDEN, LAYERS, HEADS, INTER = 64, 2, 4, 128
LORA_R, LORA_ALPHA = 4, 8
SCRIPT_ANSWER = "The heart size is normal. No pleural effusion."
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: <image>\nProvide a description of the findings in the radiology image. ASSISTANT:",
    "given the following indication: cough and fever. Is there a pleural effusion? USER ASSISTANT </s>",
    "The heart size is normal. No pleural effusion. The lungs are clear. yes no\n\n",
]


@dataclass
class LlavaFiles:
    root: Path
    model: Path
    llama: Path
    model_config: Path

    def args(self) -> list[str]:
        return ["--model", str(self.model), "--llama", str(self.llama), "--model-config", str(self.model_config)]


def _tokenizer(folder: Path) -> None:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 30),
        model_writer=buf,
        model_type="bpe",
        vocab_size=300,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        add_dummy_prefix=True,
        # as LLaMA's tokenizer.model: no normalisation ("\n" stays a byte), "USER: " keeps its trailing "▁"
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, **specials})
    )
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))


def open_clip_tower_state(gen) -> dict:
    """A random open_clip checkpoint state dict (timm ViT trunk names, built from timm's layout)."""
    import torch

    w, t = TOWER["width"], TOWER
    grid = t["image_size"] // t["patch_size"]

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    sd = {
        "visual.trunk.cls_token": r(1, 1, w),
        "visual.trunk.pos_embed": r(1, grid * grid + 1, w),
        "visual.trunk.patch_embed.proj.weight": r(w, 3, t["patch_size"], t["patch_size"], std=0.1),
        "visual.trunk.patch_embed.proj.bias": r(w, std=0.05),
        "visual.trunk.norm.weight": 1 + r(w, std=0.1),
        "visual.trunk.norm.bias": r(w, std=0.05),
        "visual.head.proj.weight": r(16, w),
        "text.transformer.embeddings.word_embeddings.weight": r(50, 16),
        "text.proj.0.weight": r(16, 16),
        "logit_scale": torch.tensor(4.6),
    }
    for i in range(t["depth"]):
        p = f"visual.trunk.blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"] = 1 + r(w, std=0.1)
            sd[p + n + ".bias"] = r(w, std=0.05)
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = r(3 * w, w), r(3 * w, std=0.05)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(w, w), r(w, std=0.05)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(4 * w, w), r(4 * w, std=0.05)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(w, 4 * w), r(w, std=0.05)
        sd[p + "ls1.gamma"], sd[p + "ls2.gamma"] = 0.5 + r(w, std=0.1), 0.5 + r(w, std=0.1)
    return sd


def llava_config() -> dict:
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "vocab_size": 300,
        "max_position_embeddings": 1024,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "mm_vision_tower": "biomedclip_cxr_518",
        "mm_vision_tower_config": "llava/model/multimodal_encoder/open_clip_encoder/model_configs/biomedclip_cxr_518.json",
        "mm_vision_tower_checkpoint": "biomedclipcxr_518_checkpoint.pt",
        "mm_hidden_size": TOWER["width"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "square",
        "use_mm_proj": True,
    }


def build_tiny(root: Path) -> LlavaFiles:
    import torch
    from peft import LoraConfig, get_peft_model
    from scripted_answers import script_bias
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from backend.minigpt.tokenization import MiniGPTTokenizer

    gen = torch.Generator().manual_seed(2024)
    torch.manual_seed(2024)
    base, model = root / "vicuna-7b-v1.5", root / "llava-rad"
    base.mkdir(parents=True)
    model.mkdir()
    _tokenizer(base)
    tok = MiniGPTTokenizer(base)
    assert tok.vocab_size == 300, tok.vocab_size
    cfg = llava_config()
    llm = LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith(("mm_", "image_", "use_mm", "arch", "model_"))})
    ).eval()
    llm.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, sequence_bias=script_bias(tok.encode(SCRIPT_ANSWER, add_bos=False), tok.eos_id)
    )
    llm.save_pretrained(str(base), safe_serialization=True)
    (model / "config.json").write_text(json.dumps(cfg))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        llm, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=targets, lora_dropout=0.05, bias="none")
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(str(model), safe_serialization=False)
    proj = {
        "base_model.model.model.mm_projector.0.weight": torch.randn(HIDDEN, TOWER["width"], generator=gen) * 0.2,
        "base_model.model.model.mm_projector.0.bias": torch.randn(HIDDEN, generator=gen) * 0.05,
        "base_model.model.model.mm_projector.2.weight": torch.randn(HIDDEN, HIDDEN, generator=gen) * 0.2,
        "base_model.model.model.mm_projector.2.bias": torch.randn(HIDDEN, generator=gen) * 0.05,
    }
    torch.save(proj, model / "non_lora_trainables.bin")
    (model / "biomedclipcxr_518.json").write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {
                    "timm_model_name": "vit_base_patch14_dinov2",
                    "timm_model_pretrained": False,
                    "timm_pool": "",
                    "timm_proj": "linear",
                    "image_size": 518,
                },
                "text_cfg": {
                    "hf_model_name": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract",
                    "hf_proj_type": "mlp",
                    "hf_pooler_type": "cls_last_hidden_state_pooler",
                    "context_length": 256,
                },
            }
        )
    )
    state = {"module." + k: v for k, v in open_clip_tower_state(gen).items()}
    torch.save(
        {"epoch": 10, "name": "biomedclip_cxr_518", "state_dict": state}, model / "biomedclipcxr_518_checkpoint.pt"
    )
    (root / "model_config.json").write_text(json.dumps({"vision": TOWER}))
    return LlavaFiles(root, model, base, root / "model_config.json")


_CACHE: dict[str, LlavaFiles] = {}


def tiny_llava_rad() -> LlavaFiles:
    """Built once per process in a temp dir."""
    if "x" not in _CACHE:
        _CACHE["x"] = build_tiny(Path(tempfile.mkdtemp(prefix="llava-rad-tiny-")))
    return _CACHE["x"]
