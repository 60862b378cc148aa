"""BiMediX2's folder -> a transformers ``LlavaForConditionalGeneration`` folder (the llava-hf layout), for
``--engine hf`` and for vLLM (whose LLaVA takes this layout with a CLIP tower; the original ``llava_llama`` layout is
not a vLLM architecture).

What is written (into a temporary folder renamed into place, so it is there whole or not at all):

* the tensors under the llava-hf names: ``language_model.model.*`` / ``language_model.lm_head.weight`` (the Llama
  tensors), ``vision_tower.vision_model.*`` (the CLIP tower, from the shards or ``--vision-tower``),
  ``multi_modal_projector.linear_1.*`` / ``linear_2.*`` (``model.mm_projector.0.*`` / ``.2.*``; only ``mlp2x_gelu``
  maps onto transformers' projector), in safetensors shards with an index;
* ``config.json``: ``LlavaConfig`` with the Llama keys of BiMediX2's config.json as ``text_config``, the CLIP tower's
  as ``vision_config``, ``vision_feature_layer`` = ``mm_vision_select_layer``, ``vision_feature_select_strategy``
  ``default`` (the class token dropped, LLaVA's ``patch``), ``projector_hidden_act`` ``gelu``;
* the image token: no token is added (that would change the vocabulary); the first of Llama 3's unused
  ``<|reserved_special_token_N|>`` is the image placeholder (``image_token_index``), expanded by ``LlavaProcessor``;
* ``preprocessor_config.json``: ``LlavaImageProcessor`` with ``do_pad`` (pad to a square with the mean colour, as
  ``expand2square``), the tower's size, CLIP mean/std; ``processor_config.json``; the tokenizer files;
  ``chat_template.jinja`` reproducing ``conv_llama3`` (the fixed system text with its written
  ``<|begin_of_text|>``, ``<|start_header_id|>ROLE<|end_header_id|>\\n\\n`` + message + ``<|eot_id|>``, the image
  placeholder and a newline before the text of the message that holds the image); ``generation_config.json`` copied.

The converted model computes what ``--engine llava --family bimedix2`` computes (tested on the tiny model: same
prompt ids, pixels and logits). Not checked with the real files or with vLLM here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from backend.minigpt.weights import LoadOptions, WeightsError

from .bimedix2_config import Bimedix2Config
from .bimedix2_template import ROLES, SEP, SYSTEM
from .bimedix2_weights import load_bimedix2, tower_names

SHARD_BYTES = 4 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def chat_template(image_token: str) -> str:
    """Jinja for ``conv_llama3`` over transformers chat messages (content a string or a list of parts)."""
    system = json.dumps(SYSTEM + SEP)
    head, tail = json.dumps(ROLES[0].split("user")[0]), json.dumps(ROLES[0].split("user")[1])
    return (
        "{{- " + system + " -}}"
        "{%- for m in messages -%}"
        "{{- " + head + " + m['role'] + " + tail + " -}}"
        "{%- if m['content'] is string -%}{{- m['content'] | trim -}}"
        "{%- else -%}"
        "{%- for c in m['content'] if c['type'] == 'image' -%}{{- "
        + json.dumps(image_token + "\n")
        + " -}}{%- endfor -%}"
        "{%- for c in m['content'] if c['type'] == 'text' -%}{{- c['text'] | trim -}}{%- endfor -%}"
        "{%- endif -%}"
        "{{- " + json.dumps(SEP) + " -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + json.dumps(ROLES[1]) + " -}}{%- endif -%}"
    )


def image_placeholder(tokenizer_json: Path) -> tuple[str, int]:
    """The first ``<|reserved_special_token_N|>`` of the tokenizer (Llama 3's unused special tokens)."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    reserved = [
        (int(t["content"][len("<|reserved_special_token_") : -2]), t["content"], int(t["id"]))
        for t in data.get("added_tokens", [])
        if t.get("content", "").startswith("<|reserved_special_token_") and t["content"][-2:] == "|>"
    ]
    if not reserved:
        raise WeightsError(f"{tokenizer_json}: no <|reserved_special_token_N|> to use as the image placeholder")
    _, content, idx = min(reserved)
    return content, idx


def _write_shards(out: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append({})
            size = 0
        groups[-1][k] = t.contiguous()
        size += n
    wmap = {}
    for i, g in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(g, str(out / name), metadata={"format": "pt"})
        wmap.update(dict.fromkeys(g, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": wmap}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def convert_to_llava_hf(folder: str | Path, out: str | Path, cfg: Bimedix2Config, dtype: torch.dtype) -> dict[str, Any]:
    t0 = time.perf_counter()
    folder, out = Path(folder), Path(out)
    if out.exists():
        raise WeightsError(f"--out {out} exists; choose a new folder")
    if cfg.projector_type != "mlp2x_gelu":
        raise WeightsError(
            f"mm_projector_type {cfg.projector_type!r}: transformers' LLaVA projector is mlp2x_gelu only"
        )
    token, token_id = image_placeholder(folder / "tokenizer.json")
    model, _report = load_bimedix2(folder, cfg, LoadOptions(device="cpu", dtype=dtype))
    state: dict[str, torch.Tensor] = {f"language_model.{k}": v for k, v in model.llm.state_dict().items()}
    names = tower_names(model.vision_tower)
    tower = model.vision_tower.state_dict()
    state.update({f"vision_tower.{c}": tower[k] for k, c in names.items()})
    proj = model.mm_projector.state_dict()
    for i, j in (("0", "1"), ("2", "2")):
        for p in ("weight", "bias"):
            state[f"multi_modal_projector.linear_{j}.{p}"] = proj[f"{i}.{p}"]
    src = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text_config = {**cfg.llm, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text_config,
        "vision_config": {**cfg.vision, "model_type": "clip_vision_model"},
        "image_token_index": token_id,
        "image_seq_length": cfg.image_tokens,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": cfg.select_layer,
        "vision_feature_select_strategy": "default" if cfg.select_feature == "patch" else "full",
        "tie_word_embeddings": bool(cfg.llm.get("tie_word_embeddings", False)),
        "torch_dtype": str(dtype).replace("torch.", ""),
        "converted_from": {"format": "llava_llama (BiMediX2)", "mm_vision_tower": src.get("mm_vision_tower")},
    }
    size = {"height": cfg.image_size, "width": cfg.image_size}
    preprocessor = {
        "image_processor_type": "LlavaImageProcessor",
        "processor_class": "LlavaProcessor",
        "do_pad": cfg.aspect == "pad",
        "do_resize": True,
        "size": {"shortest_edge": cfg.image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": size,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg.mean),
        "image_std": list(cfg.std),
        "do_convert_rgb": True,
    }
    processor = {
        "processor_class": "LlavaProcessor",
        "image_token": token,
        "patch_size": int(cfg.vision["patch_size"]),
        "vision_feature_select_strategy": config["vision_feature_select_strategy"],
        "num_additional_image_tokens": 1,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=str(out.parent)))
    try:
        _write_shards(tmp, state)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
        (tmp / "processor_config.json").write_text(json.dumps(processor, indent=2))
        (tmp / "chat_template.jinja").write_text(chat_template(token))
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "seconds": time.perf_counter() - t0, "image_token": token, "tensors": len(state)}
