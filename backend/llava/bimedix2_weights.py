"""Strict loading of BiMediX2's released folder (``MBZUAI/BiMediX2-8B``: ``config.json``, ``model.safetensors.index.json``
+ ``model-0000N-of-0000M.safetensors``, ``generation_config.json``, the Llama 3 ``tokenizer.json``).

The folder is what LLaVA++'s ``merge_lora_weights.py`` saves (``LlavaLlamaForCausalLM.save_pretrained`` after the
LoRA merge), so its tensor names are the module paths of ``LlavaLlamaForCausalLM``:

* ``model.embed_tokens.*``, ``model.layers.N.*``, ``model.norm.*``, ``lm_head.*`` -> transformers'
  ``LlamaForCausalLM``, unchanged (it is loaded by transformers from the shards with a ``LlamaConfig`` built from
  config.json; every one of its tensors must be there);
* ``model.mm_projector.{0,2}.{weight,bias}`` -> the projector's ``{0,2}.*``;
* ``model.vision_tower.vision_tower.vision_model.*`` -> ``CLIPVisionModel``'s ``vision_model.*`` (the tower is a
  submodule when the merge script saves: the builder loads it before returning the model).

The vision tower: LLaVA's loader builds the tower late (``delay_load``) and reads it from the checkpoint
``mm_vision_tower`` names (``CLIPVisionModel.from_pretrained("openai/clip-vit-large-patch14-336")``), ignoring any
tower tensors in the shards. ``--vision-tower DIR`` does the same from a local copy of that checkpoint (its
``vision_model.*``; the text tower, the projections and ``logit_scale`` are ignored and reported). Without it the
tower tensors of the shards are used — the frozen tower saved with the merged model (LoRA training leaves the tower
frozen: LLaVA's ``find_all_linear_names`` skips it), so the same weights — and a folder without them is an error
asking for ``--vision-tower``. Missing, unknown or mis-shaped tensors are errors naming the file and the tensor.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from backend.minigpt.weights import LoadOptions, LoadReport, WeightsError, _names, torch_load

from .bimedix2_config import Bimedix2Config
from .clip_model import LlavaClip
from .weights import check_tensors

PROJECTOR = "model.mm_projector."
TOWER = "model.vision_tower.vision_tower."
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
CLIP_IGNORED = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")


def shard_keys(folder: Path) -> dict[str, Path]:
    """{tensor name: shard file} of a safetensors folder (index or single file), each name once."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a safetensors index (no weight_map): {e}") from e
        files = sorted({folder / f for f in wmap.values()})
    elif (folder / "model.safetensors").is_file():
        wmap, files = None, [folder / "model.safetensors"]
    else:
        raise WeightsError(f"{folder}: no model.safetensors.index.json or model.safetensors (BiMediX2's shards)")
    out: dict[str, Path] = {}
    for f in files:
        if not f.is_file():
            raise WeightsError(f"{index}: names the shard {f.name}, which is not in the folder")
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if k in out:
                    raise WeightsError(f"{f}: {k} is also in {out[k].name}")
                out[k] = f
    if wmap is not None:
        listed = {k for k, v in wmap.items() if out.get(k) == folder / v}
        if listed != set(wmap):
            raise WeightsError(f"{index}: tensors not in the shard it names: {_names(set(wmap) - listed)}")
    return out


def tower_names(vision) -> dict[str, str]:
    """{our CLIPVisionModel parameter name: its name in a CLIP checkpoint}: checkpoints (transformers 4.x, and
    CLIPModel in any version) write ``vision_model.embeddings...``; transformers 5's ``CLIPVisionModel`` has no
    ``vision_model.`` level (its base-model prefix)."""
    out = {}
    for k in vision.state_dict():
        if not k.endswith("position_ids"):
            out[k] = k if k.startswith("vision_model.") else "vision_model." + k
    return out


def read_tensors(where: dict[str, Path], keys) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(where[k], []).append(k)
    for f, ks in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            for k in ks:
                out[k] = sf.get_tensor(k)
    return out


def load_clip_dir(d: Path, expected: dict[str, torch.Size], trust: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A local CLIP checkpoint (CLIPModel or CLIPVisionModel) -> {CLIPVisionModel name: tensor}, ignored keys."""
    if (d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file():
        where = shard_keys(d)
        sd = read_tensors(where, where)
        src = str(d)
    elif (d / "pytorch_model.bin").is_file():
        sd = torch_load(d / "pytorch_model.bin", trust)
        src = str(d / "pytorch_model.bin")
    else:
        raise WeightsError(f"--vision-tower {d}: no model.safetensors or pytorch_model.bin (a CLIP checkpoint folder)")
    if not isinstance(sd, dict) or not any(str(k).startswith("vision_model.") for k in sd):
        raise WeightsError(f"{src}: no vision_model.* tensors: not a CLIP checkpoint")
    ignored = [k for k in sd if k.startswith(CLIP_IGNORED) or k.endswith(IGNORED_SUFFIXES)]
    got = {k: v for k, v in sd.items() if k not in set(ignored)}
    check_tensors("vision tower", src, got, expected, "")
    return got, ignored


def _load_llm(folder: Path, cfg: Bimedix2Config, opts: LoadOptions):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw: dict[str, Any] = {"dtype": opts.dtype, "output_loading_info": True, "low_cpu_mem_usage": True}
    if opts.device != "cpu":
        kw["device_map"] = {"": opts.device}
    try:
        llm_cfg = LlamaConfig(**cfg.llm)
        loaded: Any = LlamaForCausalLM.from_pretrained(str(folder), config=llm_cfg, local_files_only=True, **kw)
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"{folder}: could not load the Llama weights: {str(e).splitlines()[0][:300]}") from e
    llm, info = loaded
    return llm.eval(), info


def load_bimedix2(folder: str | Path, cfg: Bimedix2Config, opts: LoadOptions) -> tuple[LlavaClip, LoadReport]:
    t0 = time.perf_counter()
    folder = Path(folder)
    if opts.quantize != "none":
        raise WeightsError("--quantize is not supported for BiMediX2 by the LLaVA engine")
    where = shard_keys(folder)
    proj_keys = [k for k in where if k.startswith(PROJECTOR)]
    tower_keys = [k for k in where if k.startswith(TOWER) and not k.endswith(IGNORED_SUFFIXES)]
    with torch.device("meta"):
        skeleton = LlavaClip(cfg, None)
    proj_shapes = {k: v.shape for k, v in skeleton.mm_projector.state_dict().items()}
    names = tower_names(skeleton.vision_tower)
    tower_shapes = {names[k]: v.shape for k, v in skeleton.vision_tower.state_dict().items() if k in names}
    if not proj_keys:
        hint = " (this looks like a plain Llama folder)" if any(k.startswith("model.layers.") for k in where) else ""
        raise WeightsError(f"{folder}: no {PROJECTOR}* tensors in the shards: not a merged BiMediX2 folder{hint}")
    proj = {k[len(PROJECTOR) :]: v for k, v in read_tensors(where, proj_keys).items()}
    check_tensors("projector", str(folder), proj, proj_shapes, PROJECTOR)
    report = LoadReport(source="original", lora="merged by the authors")
    if cfg.tower_dir:
        tower, ignored = load_clip_dir(Path(cfg.tower_dir), tower_shapes, opts.trust_checkpoints)
        report.ignored["vision_tower"] = ignored + [f"{folder.name}: {k}" for k in tower_keys]
    else:
        if not tower_keys:
            raise WeightsError(
                f"{folder}: the shards hold no vision tower ({TOWER}*): pass --vision-tower with a local copy of "
                f"{cfg.tower_name} (the checkpoint config.json's mm_vision_tower names)"
            )
        tower = {k[len(TOWER) :]: v for k, v in read_tensors(where, tower_keys).items()}
        check_tensors("vision tower", str(folder), tower, tower_shapes, TOWER)
    llm, info = _load_llm(folder, cfg, opts)
    known = set(proj_keys) | {k for k in where if k.startswith(TOWER)}
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(IGNORED_SUFFIXES)]
    unexpected = [k for k in info.get("unexpected_keys", []) if k not in known and not k.endswith(IGNORED_SUFFIXES)]
    mism = [m[0] for m in info.get("mismatched_keys", [])]
    if missing or unexpected or mism:
        raise WeightsError(
            f"{folder}: the Llama tensors do not match config.json: missing {_names(missing) or 'none'}; "
            f"unexpected {_names(unexpected) or 'none'}; mismatched {_names(mism) or 'none'}"
        )
    report.loaded["llm"] = len(llm.state_dict())
    model = _assemble(cfg, llm, tower, proj, opts)
    report.loaded.update(vision_tower=len(tower), mm_projector=len(proj))
    report.seconds = time.perf_counter() - t0
    return model, report


def _assemble(cfg: Bimedix2Config, llm, tower: dict, proj: dict, opts: LoadOptions) -> LlavaClip:
    dev = torch.device(opts.device)
    with torch.device("meta"):
        model = LlavaClip(cfg, None)
    model.llm = llm
    names = tower_names(model.vision_tower)
    model.vision_tower.load_state_dict(
        {k: tower[c].to(device=dev, dtype=opts.dtype) for k, c in names.items()}, strict=True, assign=True
    )
    emb = getattr(model.vision_tower, "vision_model", model.vision_tower).embeddings
    n = emb.position_embedding.weight.shape[0]
    emb.register_buffer("position_ids", torch.arange(n, device=dev).expand((1, -1)), persistent=False)
    model.mm_projector.load_state_dict(
        {k: v.to(device=dev, dtype=opts.dtype) for k, v in proj.items()}, strict=True, assign=True
    )
    left = [n for n, t in [*model.vision_tower.named_parameters(), *model.vision_tower.named_buffers()] if t.is_meta]
    if left:
        raise WeightsError(f"vision tower tensors not filled: {_names(left)}")
    return model.eval()
