"""A TINY BiMediX2 built offline in its authors' file layout: the folder LLaVA++'s ``merge_lora_weights.py`` saves
(``LlavaLlamaForCausalLM.save_pretrained`` after the LoRA merge; ``mbzuai-oryx/BiMediX2`` ``scripts/merge_lora.sh``):

* ``BiMediX2-8B/``: ``config.json`` (LLaVA++'s ``LlavaConfig``, ``model_type`` ``llava_llama``: Llama 3.1's keys in
  transformers 4.x form, ``rope_scaling`` of type ``llama3`` included, plus the ``mm_*`` keys ``stage2_train.sh``
  sets), two safetensors shards with ``model.safetensors.index.json`` (``model.*``/``lm_head.*`` of the LLM,
  ``model.mm_projector.{0,2}.*``, ``model.vision_tower.vision_tower.vision_model.*``), ``generation_config.json``
  (Llama 3.1 Instruct's EOS list; a transformers ``sequence_bias`` scripts the greedy answer) and a byte-level BPE
  ``tokenizer.json`` with Llama 3's special tokens (``<|begin_of_text|>`` added by its post-processor) and LLaVA++'s
  added ``<pad>``;
* ``clip-vit-large-patch14-336/``: a tiny CLIP checkpoint (``CLIPModel.save_pretrained``: text and vision towers,
  projections, ``logit_scale``) and its ``preprocessor_config.json``, for ``--vision-tower``; its vision weights
  differ from the ones saved in the shards, so a test can tell which were used.

The tower's dimensions are tiny, so ``model_config.json`` (``--model-config``) gives them instead of CLIP-L/336's.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "patch_size": 8,
    "image_size": 32,
    "projection_dim": 16,
}
HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 64, 2, 4, 2, 128
SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
#: English and Arabic; the Arabic letters are not in the tokenizer's corpus, so each is two byte tokens
SCRIPT_ANSWER = "The heart is normal. القلب طبيعي."
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "system user assistant\n\n Describe this medical image in detail and list the findings.",
    "The heart is normal. Is there a pleural effusion? The lungs are clear. yes no",
]


@dataclass
class Bimedix2Files:
    root: Path
    model: Path
    clip: Path
    model_config: Path
    reference: Any  # the in-memory modules the folder was written from: {"vision", "projector", "llm"}

    def args(self) -> list[str]:
        return ["--model", str(self.model), "--model-config", str(self.model_config)]


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.add_special_tokens({"pad_token": "<pad>"})  # LLaVA++'s train.py for --version llama3
    fast.save_pretrained(str(folder))
    return fast


def llava_llama_config(vocab: int, bos: int, eos: list[int]) -> dict:
    return {
        "_name_or_path": "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "max_position_embeddings": 1024,
        "mlp_bias": False,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pad_token_id": vocab - 1,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.41.0.dev0",
        "use_cache": True,
        "vocab_size": vocab,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": 2e-05,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": False,
        "use_mm_proj": True,
    }


def write_shards(folder: Path, state: dict, n: int = 2) -> None:
    from safetensors.torch import save_file

    keys = list(state)
    per = (len(keys) + n - 1) // n
    wmap, total = {}, 0
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        wmap.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wmap})
    )


def build_tiny(root: Path) -> Bimedix2Files:
    import torch
    from scripted_answers import script_bias
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(2025)
    model, clip = root / "BiMediX2-8B", root / "clip-vit-large-patch14-336"
    model.mkdir(parents=True)
    clip.mkdir()
    tok = _tokenizer(model)
    vocab = len(tok)
    bos, eot = tok.bos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    eos = [tok.convert_tokens_to_ids("<|end_of_text|>"), eot]
    cfg = llava_llama_config(vocab, bos, eos)
    llm_keys = {
        k: v
        for k, v in cfg.items()
        if not k.startswith(("mm_", "image_", "use_mm", "tune_", "freeze_", "unfreeze_", "tokenizer_"))
    }
    llm_keys = {k: v for k, v in llm_keys.items() if k not in ("architectures", "model_type", "_name_or_path")}
    llm = LlamaForCausalLM(LlamaConfig(**llm_keys)).eval()
    vision = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    projector = torch.nn.Sequential(
        torch.nn.Linear(VISION["hidden_size"], HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN)
    ).eval()
    state = {k: v for k, v in llm.state_dict().items()}
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    # the tower as transformers 4.x's CLIPVisionModel names it (LLaVA++ trains on 4.41): vision_model.*
    for k, v in vision.state_dict().items():
        if not k.endswith("position_ids"):
            state[
                "model.vision_tower.vision_tower." + (k if k.startswith("vision_model.") else "vision_model." + k)
            ] = v
    write_shards(model, state)
    (model / "config.json").write_text(json.dumps(cfg, indent=2))
    answer = tok(SCRIPT_ANSWER, add_special_tokens=False).input_ids
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, sequence_bias=script_bias(answer, eot)).save_pretrained(
        str(model)
    )
    clip_cfg = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 99,
            "max_position_embeddings": 16,
        },
        vision_config=VISION,
        projection_dim=16,
    )
    CLIPModel(clip_cfg).save_pretrained(str(clip))
    CLIPImageProcessor(
        size={"shortest_edge": VISION["image_size"]},
        crop_size={"height": VISION["image_size"], "width": VISION["image_size"]},
    ).save_pretrained(str(clip))
    (root / "model_config.json").write_text(json.dumps({"vision": VISION}))
    ref = {"vision": vision, "projector": projector, "llm": llm}
    return Bimedix2Files(root, model, clip, root / "model_config.json", ref)


_CACHE: dict[str, Bimedix2Files] = {}


def tiny_bimedix2() -> Bimedix2Files:
    """Built once per process in a temp dir."""
    if "x" not in _CACHE:
        _CACHE["x"] = build_tiny(Path(tempfile.mkdtemp(prefix="bimedix2-tiny-")))
    return _CACHE["x"]
