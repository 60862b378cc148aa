"""Strict loading of the three files users have, or of a converted folder.

Original files:
* ``eva_vit_g.pth`` (BLIP-2/LAVIS release): EVA ViT-g state dict with a 16x16+1 ``pos_embed`` and 40 blocks.
* ``Llama-2-7b-chat-hf`` folder: ``config.json`` + weights (safetensors or .bin) + ``tokenizer.model``.
* the MiniGPT-Med checkpoint ``.pth``: ``{'model': {...}, 'optimizer': ..., ...}`` whose ``model`` holds
  ``llama_proj.{weight,bias}`` and, per decoder layer, peft-0.2.0 LoRA tensors (no ``.default``) and a
  ``rotary_emb.inv_freq`` buffer.

Every tensor the model needs is loaded exactly once; keys are matched by the declared map below and anything
missing or unknown is named in the error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..setting_error import SettingError
from .config import MiniGPTMedConfig
from .eva_vit import interpolate_pos_embed
from .model import MiniGPTMed, add_lora, merge_lora

log = logging.getLogger("minigptmed.weights")

CKPT_PREFIX = "llama_model.base_model.model.model."

# ---- declared key map ---------------------------------------------------------------------------------------
# MiniGPT-Med checkpoint 'model' dict -> our names
RE_PROJ = re.compile(r"^llama_proj\.(weight|bias)$")
RE_LORA = re.compile(
    r"^llama_model\.base_model\.model\.model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_(A|B)(?:\.default)?\.weight$"
)
RE_INV_FREQ = re.compile(r"^llama_model\.base_model\.model\.model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq$")
# eva_vit_g.pth keys the original model does not have (it loads with strict=False and drops them)
RE_EVA_EXTRA_BLOCK = re.compile(r"^blocks\.(\d+)\.")
EVA_IGNORABLE = (
    re.compile(r"^(norm|fc_norm|head|rel_pos_bias)\."),
    re.compile(r"\.relative_position_(bias_table|index)$"),
)
RE_EVA_MATMUL = re.compile(r"(^patch_embed\.proj\.|\.(qkv|proj|fc1|fc2)\.)")
# MiniGPT-4 (v1) markers
V1_MARKERS = ("query_tokens", "Qformer.", "llama_model.model.", "ln_vision.")

CONVERTED_MARKER = "minigptmed_config.json"


class WeightsError(Exception):
    """A weight file is missing, of the wrong model, or does not match the expected layout."""


class WeightsSettingError(WeightsError, SettingError):
    """A weights error that one setting caused or can fix (named in the message as ``{setting}``)."""


@dataclass
class LoadReport:
    source: str
    loaded: dict[str, int] = field(default_factory=dict)  # part -> tensors loaded
    ignored: dict[str, list[str]] = field(default_factory=dict)  # part -> keys deliberately ignored
    seconds: float = 0.0
    lora: str = "merged"
    notes: list[str] = field(default_factory=list)


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def torch_load(path: str | Path, trust: bool = False) -> Any:
    """Tensors only (``weights_only=True``); ``trust`` (the ``trust_checkpoints`` setting) allows pickled objects."""
    if not os.path.isfile(path):
        raise WeightsError(f"file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsSettingError(_unsafe_msg(path, e), "trust_checkpoints") from e
    except Exception as e:  # pickle.UnpicklingError and friends
        if trust:
            log.warning("loading %s with weights_only=False (trust_checkpoints)", path)
            return torch.load(path, map_location="cpu", weights_only=False)
        raise WeightsSettingError(_unsafe_msg(path, e), "trust_checkpoints") from e


def _unsafe_msg(path, e) -> str:
    return (
        f"{path}: cannot be read as a plain tensor checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
        "It may hold arbitrary Python objects; if you trust the file, turn on {trust_checkpoints}."
    )


# ---- LLaMA folder ---------------------------------------------------------------------------------------------


def read_llama_config(folder: str | Path) -> dict:
    p = Path(folder) / "config.json"
    if not p.is_file():
        raise WeightsError(
            f"{folder}: not a Hugging Face LLaMA folder (no config.json); pass the Llama-2-7b-chat-hf folder"
        )
    cfg = json.loads(p.read_text())
    if cfg.get("model_type") not in (None, "llama"):
        raise WeightsError(f"{folder}: model_type is {cfg.get('model_type')!r}; MiniGPT-Med needs LLaMA-2-7B-chat")
    return cfg


def check_llm_hidden(llama_cfg: dict, expected: int | None, folder: str | Path) -> None:
    got = int(llama_cfg.get("hidden_size", -1))
    if expected is not None and got != expected:
        hint = " (that is a 13B model)" if got == 5120 else ""
        raise WeightsError(
            f"MiniGPT-Med needs the 7B LLaMA-2 base: hidden size {expected} expected, found {got} "
            f"in {folder}/config.json{hint}. Use Llama-2-7b-chat-hf."
        )


# ---- MiniGPT-Med checkpoint -------------------------------------------------------------------------------------


@dataclass
class CheckpointParts:
    proj: dict[str, torch.Tensor]
    lora: dict[str, torch.Tensor]  # 'layers.{i}.self_attn.{q_proj}.lora_{A}.weight' -> tensor
    ignored: list[str]


def load_checkpoint(
    path: str | Path, cfg: MiniGPTMedConfig, n_layers: int, hidden: int, trust: bool = False
) -> CheckpointParts:
    obj = torch_load(path, trust)
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict with a 'model' entry, got {type(obj).__name__}")
    sd = obj.get("model", None)
    if sd is None:
        if any(k.startswith(("llama_proj.", "llama_model.")) for k in obj):
            sd = obj
        else:
            raise WeightsError(
                f"{path}: no 'model' entry (top-level keys: {_names(obj.keys())}); is this the MiniGPT-Med checkpoint?"
            )
    keys = list(sd.keys())
    pw = sd.get("llama_proj.weight")
    has_lora = any(RE_LORA.match(k) for k in keys)
    if any(k.startswith(V1_MARKERS[:2]) for k in keys) or (
        pw is not None and not has_lora and pw.shape[1] != cfg.proj_in
    ):
        in_f = None if pw is None else pw.shape[1]
        raise WeightsError(
            f"{path} looks like a MiniGPT-4 (v1) checkpoint (Q-Former based, llama_proj takes {in_f} "
            f"features, no LoRA); MiniGPT-Med is MiniGPT-v2-based and needs its own checkpoint "
            f"(llama_proj {cfg.proj_in} -> {hidden} plus LoRA tensors)"
        )
    proj, lora, ignored, unexpected = {}, {}, [], []
    for k in keys:
        t = sd[k]
        if m := RE_PROJ.match(k):
            proj[m.group(1)] = t
        elif m := RE_LORA.match(k):
            i, mod, ab = int(m.group(1)), m.group(2), m.group(3)
            if i >= n_layers or mod not in cfg.lora.targets:
                unexpected.append(k)
                continue
            name = f"layers.{i}.self_attn.{mod}.lora_{ab}.weight"
            if name in lora:
                raise WeightsError(f"{path}: {name} appears twice (with and without '.default')")
            lora[name] = t
        elif RE_INV_FREQ.match(k):
            ignored.append(k)  # deterministic rotary buffer (transformers 4.30 saved it); recomputed by the LLM
        else:
            unexpected.append(k)
    if unexpected:
        raise WeightsError(f"{path}: unexpected keys in the checkpoint: {_names(unexpected)}")
    expected_lora = {
        f"layers.{i}.self_attn.{m}.lora_{ab}.weight" for i in range(n_layers) for m in cfg.lora.targets for ab in "AB"
    }
    missing = sorted(expected_lora - set(lora)) + [f"llama_proj.{n}" for n in ("weight", "bias") if n not in proj]
    if missing:
        raise WeightsError(
            f"{path}: missing keys in the checkpoint: {_names(missing)}"
            + (" (no LoRA tensors at all: is this a MiniGPT-Med checkpoint?)" if not lora else "")
        )
    if tuple(proj["weight"].shape) != (hidden, cfg.proj_in):
        got = tuple(proj["weight"].shape)
        if got[0] != hidden:
            raise WeightsError(
                f"{path}: llama_proj maps to {got[0]} features but the LLaMA base has hidden size "
                f"{hidden}; MiniGPT-Med needs the 7B LLaMA-2 base: hidden size {got[0]} expected, found {hidden}"
            )
        raise WeightsError(
            f"{path}: llama_proj.weight has shape {got}, expected {(hidden, cfg.proj_in)} "
            f"(vision width {cfg.vision.width} x {cfg.tokens_per_group})"
        )
    r = cfg.lora.r
    for name, t in lora.items():
        want = (r, hidden) if ".lora_A." in name else (None, r)
        if t.shape[-1] != want[1] or (want[0] is not None and t.shape[0] != want[0]):
            raise WeightsError(f"{path}: {name} has shape {tuple(t.shape)}; expected LoRA rank {r} on hidden {hidden}")
    return CheckpointParts(proj=proj, lora=lora, ignored=ignored)


# ---- EVA ---------------------------------------------------------------------------------------------------------


def load_eva(
    path: str | Path, cfg: MiniGPTMedConfig, expected_keys: dict[str, torch.Size], trust: bool = False
) -> tuple[dict, list[str]]:
    obj = torch_load(path, trust)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: not a state dict")
    out, ignored, unexpected = {}, [], []
    for k, t in obj.items():
        k2 = k[len("visual_encoder.") :] if k.startswith("visual_encoder.") else k
        if k2 in expected_keys:
            out[k2] = t
            continue
        m = RE_EVA_EXTRA_BLOCK.match(k2)
        if (m and int(m.group(1)) >= cfg.vision.depth) or any(p.search(k2) for p in EVA_IGNORABLE):
            ignored.append(k)
        else:
            unexpected.append(k)
    if unexpected:
        raise WeightsError(f"{path}: unexpected keys for EVA ViT-g: {_names(unexpected)}")
    missing = sorted(set(expected_keys) - set(out))
    if missing:
        raise WeightsError(f"{path}: missing keys for EVA ViT-g (depth {cfg.vision.depth}): {_names(missing)}")
    if "pos_embed" in out:
        out["pos_embed"] = interpolate_pos_embed(out["pos_embed"], cfg.vision.grid)
    for k, shape in expected_keys.items():
        if tuple(out[k].shape) != tuple(shape):
            raise WeightsError(
                f"{path}: {k} has shape {tuple(out[k].shape)}, expected {tuple(shape)} "
                f"(EVA ViT-g width {cfg.vision.width}, {cfg.vision.heads} heads, mlp {cfg.vision.mlp_dim})"
            )
    return out, ignored


# ---- assembly -----------------------------------------------------------------------------------------------------


@dataclass
class LoadOptions:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    quantize: str = "none"  # none / 8bit / 4bit
    merge_lora: bool = True
    trust_checkpoints: bool = False  # torch.load(weights_only=False) for checkpoints that need it


def _quant_config(quantize: str, dtype: torch.dtype):
    if quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise WeightsSettingError(
            f"{{quantize}} {quantize} needs the bitsandbytes package (pip install bitsandbytes); "
            f"it is not importable here: {e}",
            "quantize",
        ) from e
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _load_llm(folder: str | Path, opts: LoadOptions):
    from transformers import LlamaForCausalLM

    kw: dict[str, Any] = {"dtype": opts.dtype, "output_loading_info": True, "low_cpu_mem_usage": True}
    q = _quant_config(opts.quantize, opts.dtype)
    if q is not None:
        kw["quantization_config"] = q
    if q is not None or opts.device != "cpu":
        kw["device_map"] = {"": opts.device}
    try:
        loaded: Any = LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True, **kw)
        llm, info = loaded
    except (OSError, ValueError) as e:
        raise WeightsError(f"{folder}: could not load the LLaMA weights: {e}") from e
    missing = [k for k in info.get("missing_keys", []) if "inv_freq" not in k]
    unexpected = [k for k in info.get("unexpected_keys", []) if "inv_freq" not in k]
    mism = info.get("mismatched_keys", [])
    if missing or unexpected or mism:
        raise WeightsError(
            f"{folder}: LLaMA weights do not match config.json: missing {_names(missing) or 'none'}; "
            f"unexpected {_names(unexpected) or 'none'}; mismatched {_names([m[0] for m in mism]) or 'none'}"
        )
    llm.eval()
    return llm


def attach_lora(llm, cfg: MiniGPTMedConfig, lora: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Wrap q/v projections and fill the adapters; every given tensor must be used exactly once."""
    mods = add_lora(llm, cfg, dtype)
    used = set()
    for name, mod in mods.items():
        for ab in "AB":
            key = f"{name}.lora_{ab}.weight"
            lin = getattr(mod, f"lora_{ab}")
            if tuple(lora[key].shape) != tuple(lin.weight.shape):
                raise WeightsError(f"LoRA {key}: shape {tuple(lora[key].shape)}, expected {tuple(lin.weight.shape)}")
            with torch.no_grad():
                lin.weight.copy_(lora[key].to(lin.weight.dtype))
            used.add(key)
    if used != set(lora):
        raise WeightsError(f"LoRA tensors not used: {_names(set(lora) - used)}")
    return len(used)


def _assemble(
    cfg: MiniGPTMedConfig, llm, vision_sd: dict, proj: dict, lora: dict | None, opts: LoadOptions, report: LoadReport
) -> MiniGPTMed:
    hidden = llm.config.hidden_size
    with torch.device("meta"):
        model = MiniGPTMed(cfg, None, hidden)
    model.llm = llm
    dev = torch.device(opts.device)
    mixed = dev.type == "cuda" and opts.dtype in (torch.float16, torch.bfloat16)
    vis = {}
    for k, t in vision_sd.items():
        # the original halves only Conv2d/Linear weights and biases; LayerNorms, cls/pos, q/v biases stay fp32
        is_matmul = RE_EVA_MATMUL.search(k) is not None
        tgt = opts.dtype if (not mixed or is_matmul) else torch.float32
        vis[k] = t.to(device=dev, dtype=tgt)
    model.visual_encoder.load_state_dict(vis, strict=True, assign=True)
    w = cfg.vision.width
    model.ln_vision.load_state_dict(
        {"weight": torch.ones(w, device=dev), "bias": torch.zeros(w, device=dev)}, strict=True, assign=True
    )
    proj_dtype = torch.float32 if mixed else opts.dtype
    model.llama_proj.load_state_dict(
        {k: v.to(device=dev, dtype=proj_dtype) for k, v in proj.items()}, strict=True, assign=True
    )
    model.vision_autocast = opts.dtype if mixed else None
    report.loaded["vision"] = len(vis)
    report.loaded["llama_proj"] = len(proj)
    if lora:
        quantized = opts.quantize != "none"
        report.loaded["lora"] = attach_lora(llm, cfg, lora, torch.float32 if quantized else opts.dtype)
        if opts.merge_lora and not quantized:
            merge_lora(llm)
            report.lora = "merged"
        else:
            report.lora = "separate"
            if opts.merge_lora and quantized:
                report.notes.append("LoRA kept separate: it cannot be merged into quantized weights")
    model.eval()
    return model


def read_original_parts(
    eva: str | Path, llama: str | Path, checkpoint: str | Path, cfg: MiniGPTMedConfig, trust: bool = False
):
    """Check the LLaMA folder's size, then read the checkpoint's parts and the EVA weights (strictly).
    Returns (llama config, checkpoint parts, EVA state dict, ignored EVA keys)."""
    llama_cfg = read_llama_config(llama)
    check_llm_hidden(llama_cfg, cfg.llm_hidden_size, llama)
    hidden, n_layers = int(llama_cfg["hidden_size"]), int(llama_cfg["num_hidden_layers"])
    parts = load_checkpoint(checkpoint, cfg, n_layers, hidden, trust)
    from .eva_vit import EvaViT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in EvaViT(cfg.vision).state_dict().items()}
    vision_sd, eva_ignored = load_eva(eva, cfg, shapes, trust)
    return llama_cfg, parts, vision_sd, eva_ignored


def load_original(
    eva: str | Path, llama: str | Path, checkpoint: str | Path, cfg: MiniGPTMedConfig, opts: LoadOptions
) -> tuple[MiniGPTMed, LoadReport]:
    t0 = time.perf_counter()
    for name, p in (("eva", eva), ("llama", llama), ("checkpoint", checkpoint)):
        if not p or not os.path.exists(p):
            raise WeightsSettingError("{" + name + "}: " + repr(p) + " does not exist", name)
    _llama_cfg, parts, vision_sd, eva_ignored = read_original_parts(eva, llama, checkpoint, cfg, opts.trust_checkpoints)
    llm = _load_llm(llama, opts)
    report = LoadReport(source="original")
    report.ignored = {"eva": eva_ignored, "checkpoint": parts.ignored}
    report.loaded["llm"] = len(llm.state_dict())
    model = _assemble(cfg, llm, vision_sd, parts.proj, parts.lora, opts, report)
    report.seconds = time.perf_counter() - t0
    return model, report


def is_converted(folder: str | Path | None) -> bool:
    return folder is not None and bool(str(folder)) and (Path(folder) / CONVERTED_MARKER).is_file()


def load_converted(folder: str | Path, opts: LoadOptions) -> tuple[MiniGPTMed, MiniGPTMedConfig, LoadReport]:
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    folder = Path(folder)
    if not is_converted(folder):
        raise WeightsError(
            f"{folder}: not a converted MiniGPT-Med folder (no {CONVERTED_MARKER}); "
            "write one with 'minigptmed-backend convert'"
        )
    meta = json.loads((folder / CONVERTED_MARKER).read_text())
    cfg = MiniGPTMedConfig.from_dict(meta["model_config"])
    from .eva_vit import EvaViT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in EvaViT(cfg.vision).state_dict().items()}
    vsd = load_file(str(folder / "vision.safetensors"))
    vision_sd = {k[len("visual_encoder.") :]: v for k, v in vsd.items() if k.startswith("visual_encoder.")}
    proj = {k[len("llama_proj.") :]: v for k, v in vsd.items() if k.startswith("llama_proj.")}
    extra = set(vsd) - {f"visual_encoder.{k}" for k in vision_sd} - {f"llama_proj.{k}" for k in proj}
    missing = set(shapes) - set(vision_sd)
    if extra or missing or set(proj) != {"weight", "bias"}:
        raise WeightsError(
            f"{folder}/vision.safetensors: missing {_names(missing) or 'none'}, unexpected {_names(extra) or 'none'}"
        )
    llm = _load_llm(folder / "llm", opts)
    lora = None
    if meta.get("lora") == "separate":
        lora = load_file(str(folder / "lora.safetensors"))
    report = LoadReport(source="converted")
    report.loaded["llm"] = len(llm.state_dict())
    model = _assemble(cfg, llm, vision_sd, proj, lora, opts, report)
    if lora is None:
        report.lora = "merged at conversion"
    report.seconds = time.perf_counter() - t0
    return model, cfg, report
