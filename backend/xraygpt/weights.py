"""Strict loading of the four files an XrayGPT user has (mbzuai-oryx/XrayGPT @ d0baa6a, README "Setup" and
``xraygpt/models/mini_gpt4.py``):

* ``eva_vit_g.pth`` (LAVIS/BLIP-2 release, the same file as MiniGPT-Med's): EVA ViT-g; read by
  ``backend.minigpt.weights.load_eva`` (its 40th block is not used, as in the original's 39-block model).
* ``blip2_pretrained_flant5xxl.pth`` (LAVIS): ``{'model': {...}}`` with ``query_tokens``, ``ln_vision.*`` and the
  Q-Former ``Qformer.bert.*`` (query path), renamed by ``QFORMER_KEY_MAP`` to transformers' ``Blip2QFormerModel``.
  Keys the original drops (it deletes the Q-Former's text FFN, word/position embeddings and LM head, and has no use
  for the T5 projection) are listed in ``QFORMER_IGNORED`` and reported; anything else is an error.
* the Vicuna folder (``Vicuna_Radiology_fp16``): config.json + weights + ``tokenizer.model``; loaded strictly by
  transformers' ``LlamaForCausalLM``.
* the XrayGPT checkpoint ``.pth``: ``{'model': {...}, 'optimizer', ...}`` whose ``model`` holds ``llama_proj.*``
  (the only trained part) and the buffers the MiniGPT-4 saver keeps (``Qformer.bert.embeddings.position_ids``, per
  layer ``rotary_emb.inv_freq``), which are deterministic and ignored.

Every expected tensor is loaded exactly once; a missing, unknown or mis-shaped tensor is named in the error.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from backend.minigpt.config import MiniGPTMedConfig
from backend.minigpt.eva_vit import EvaViT
from backend.minigpt.weights import (
    RE_EVA_MATMUL,
    LoadOptions,
    LoadReport,
    WeightsError,
    _load_llm,
    _names,
    load_eva,
    torch_load,
)

from .config import XrayGPTConfig
from .model import XrayGPT

# BLIP-2 checkpoint key -> Blip2QFormerModel key (``\g<n>`` groups); the declared map, nothing else is renamed
QFORMER_KEY_MAP: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)$"), r"layernorm.\1"),
    (
        re.compile(
            r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)$"
        ),
        r"encoder.layer.\1.\2.attention.\3.\4",
    ),
    (
        re.compile(
            r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)$"
        ),
        r"encoder.layer.\1.\2.output.\3.\4",
    ),
    (
        re.compile(
            r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(intermediate_query|output_query)\.(dense|LayerNorm)\.(weight|bias)$"
        ),
        r"encoder.layer.\1.\2.\3.\4",
    ),
]
QFORMER_IGNORED = (
    re.compile(r"^Qformer\.bert\.embeddings\.(position_ids|word_embeddings\.weight|position_embeddings\.weight)$"),
    re.compile(r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)$"),
    re.compile(r"^Qformer\.cls\."),
    re.compile(r"^(t5_proj|opt_proj|llm_proj)\.(weight|bias)$"),
)
RE_PROJ = re.compile(r"^llama_proj\.(weight|bias)$")
CKPT_IGNORED = (
    re.compile(r"^Qformer\.bert\.embeddings\.position_ids$"),
    re.compile(r"^llama_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
)
RE_V2_LORA = re.compile(r"lora_[AB]")


def _state_dict(path: str | Path, what: str, trust: bool = False) -> dict:
    obj = torch_load(path, trust)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    keys = _names(obj.keys()) if isinstance(obj, dict) else type(obj).__name__
    raise WeightsError(f"{path}: expected {what} with a 'model' state dict, found {keys}")


def map_qformer_key(key: str) -> str | None:
    for pat, repl in QFORMER_KEY_MAP:
        if pat.match(key):
            return pat.sub(repl, key)
    return None


def load_qformer_file(
    path: str | Path, cfg: XrayGPTConfig, expected: dict[str, torch.Size], trust: bool = False
) -> tuple[dict, list[str]]:
    """The BLIP-2 checkpoint -> {'qformer.<name>', 'query_tokens', 'ln_vision.<w|b>': tensor}, ignored keys."""
    sd = _state_dict(path, "the BLIP-2 Q-Former checkpoint (blip2_pretrained_flant5xxl.pth)", trust)
    out: dict[str, torch.Tensor] = {}
    ignored, unexpected = [], []
    for k, t in sd.items():
        if k in ("query_tokens", "ln_vision.weight", "ln_vision.bias"):
            name: str | None = k
        else:
            mapped = map_qformer_key(k)
            name = None if mapped is None else f"qformer.{mapped}"
        if name is not None and name in expected:
            if name in out:
                raise WeightsError(f"{path}: {name} would be loaded twice")
            out[name] = t
        elif any(p.match(k) for p in QFORMER_IGNORED):
            ignored.append(k)
        else:
            unexpected.append(k)
    if unexpected:
        hint = " (a MiniGPT-Med/MiniGPT-v2 file has no Q-Former)" if not any("Qformer" in k for k in sd) else ""
        raise WeightsError(f"{path}: unexpected keys for the BLIP-2 Q-Former: {_names(unexpected)}{hint}")
    missing = sorted(set(expected) - set(out))
    if missing:
        raise WeightsError(
            f"{path}: missing keys for the Q-Former ({cfg.qformer.num_layers} layers, cross-attention every "
            f"{cfg.qformer.cross_attention_freq}): {_names(missing)}"
        )
    for name, shape in expected.items():
        if tuple(out[name].shape) != tuple(shape):
            raise WeightsError(f"{path}: {name} has shape {tuple(out[name].shape)}, expected {tuple(shape)}")
    return out, ignored


def load_checkpoint(path: str | Path, cfg: XrayGPTConfig, hidden: int, trust: bool = False) -> tuple[dict, list[str]]:
    """The XrayGPT checkpoint -> ({'weight', 'bias'} of llama_proj, ignored keys)."""
    sd = _state_dict(path, "the XrayGPT checkpoint", trust)
    if any(RE_V2_LORA.search(k) for k in sd):
        raise WeightsError(
            f"{path} holds LoRA tensors: it is a MiniGPT-v2/MiniGPT-Med checkpoint, not XrayGPT's "
            "(serve it with --engine minigptmed)"
        )
    proj, ignored, unexpected = {}, [], []
    for k, t in sd.items():
        if m := RE_PROJ.match(k):
            proj[m.group(1)] = t
        elif any(p.match(k) for p in CKPT_IGNORED):
            ignored.append(k)
        else:
            unexpected.append(k)
    if unexpected:
        raise WeightsError(f"{path}: unexpected keys in the XrayGPT checkpoint: {_names(unexpected)}")
    missing = [f"llama_proj.{n}" for n in ("weight", "bias") if n not in proj]
    if missing:
        raise WeightsError(f"{path}: missing keys in the XrayGPT checkpoint: {', '.join(missing)}")
    want = (hidden, cfg.qformer.hidden_size)
    got = tuple(proj["weight"].shape)
    if got != want:
        hint = ""
        if len(got) == 2 and got[1] == cfg.vision.width * 4:
            hint = " (that is MiniGPT-v2's 4-token projection: a MiniGPT-Med checkpoint? use --engine minigptmed)"
        elif len(got) == 2 and got[0] != hidden:
            hint = f" (the LLaMA folder has hidden size {hidden}: XrayGPT needs its Vicuna-7B folder)"
        raise WeightsError(f"{path}: llama_proj.weight has shape {got}, expected {want}{hint}")
    if tuple(proj["bias"].shape) != (hidden,):
        raise WeightsError(f"{path}: llama_proj.bias has shape {tuple(proj['bias'].shape)}, expected ({hidden},)")
    return proj, ignored


def _llama_dims(folder: str | Path, cfg: XrayGPTConfig) -> tuple[int, int]:
    import json

    p = Path(folder) / "config.json"
    if not p.is_file():
        raise WeightsError(f"{folder}: not a Hugging Face LLaMA folder (no config.json); pass the Vicuna folder")
    c = json.loads(p.read_text())
    if c.get("model_type") not in (None, "llama"):
        raise WeightsError(f"{folder}: model_type is {c.get('model_type')!r}; XrayGPT needs its Vicuna (LLaMA) folder")
    hidden = int(c.get("hidden_size", -1))
    if cfg.llm_hidden_size is not None and hidden != cfg.llm_hidden_size:
        raise WeightsError(
            f"{folder}: hidden size {hidden}, but XrayGPT's llama_proj maps to {cfg.llm_hidden_size} (Vicuna-7B)"
        )
    return hidden, int(c.get("num_hidden_layers", 0))


CONVERTED_MARKER = "xraygpt_config.json"


def _expected(cfg: XrayGPTConfig, hidden: int) -> tuple[dict, dict]:
    with torch.device("meta"):
        skeleton = XrayGPT(cfg, None, hidden)
        eva_shapes = {k: v.shape for k, v in EvaViT(cfg.vision).state_dict().items()}
    expected = {f"qformer.{k}": v.shape for k, v in skeleton.qformer.state_dict().items()}
    expected.update(query_tokens=skeleton.query_tokens.shape)
    expected.update({f"ln_vision.{k}": v.shape for k, v in skeleton.ln_vision.state_dict().items()})
    return eva_shapes, expected


def read_original_parts(
    eva: str | Path, qformer: str | Path, llama: str | Path, checkpoint: str | Path, cfg: XrayGPTConfig, trust: bool
) -> dict:
    """Everything but the LLM, read and checked from the four original files."""
    for label, p in (("--eva", eva), ("--qformer", qformer), ("--llama", llama), ("--checkpoint", checkpoint)):
        if not p or not os.path.exists(p):
            raise WeightsError(f"{label}: {p!r} does not exist")
    hidden, _layers = _llama_dims(llama, cfg)
    proj, ckpt_ignored = load_checkpoint(checkpoint, cfg, hidden, trust)
    eva_shapes, expected = _expected(cfg, hidden)
    qparts, q_ignored = load_qformer_file(qformer, cfg, expected, trust)
    vision_sd, eva_ignored = load_eva(eva, MiniGPTMedConfig(vision=cfg.vision), eva_shapes, trust)
    return {
        "vision": vision_sd,
        "qformer": qparts,
        "proj": proj,
        "ignored": {"eva": eva_ignored, "qformer": q_ignored, "checkpoint": ckpt_ignored},
    }


def is_converted(folder: str | Path | None) -> bool:
    return bool(folder) and (Path(str(folder)) / CONVERTED_MARKER).is_file()


def load_converted(folder: str | Path, opts: LoadOptions) -> tuple[XrayGPT, XrayGPTConfig, LoadReport]:
    """A folder written by ``convert --qformer ...``: safetensors only, checked tensor by tensor."""
    import json

    from safetensors.torch import load_file

    t0 = time.perf_counter()
    folder = Path(folder)
    marker = folder / CONVERTED_MARKER
    if not marker.is_file():
        other = (
            " (a MiniGPT-Med converted folder: use --engine minigptmed)"
            if (folder / "minigptmed_config.json").is_file()
            else ""
        )
        raise WeightsError(f"--converted {folder}: no {CONVERTED_MARKER}: not an XrayGPT converted folder{other}")
    meta = json.loads(marker.read_text())
    if meta.get("format") != "xraygpt-converted" or meta.get("version") != 1:
        raise WeightsError(
            f"{marker}: format {meta.get('format')!r} version {meta.get('version')!r} is not ours (xraygpt-converted 1)"
        )
    cfg = XrayGPTConfig.from_dict(meta["model_config"])
    hidden, _layers = _llama_dims(folder / "llm", cfg)
    eva_shapes, expected = _expected(cfg, hidden)
    expected.update({f"visual_encoder.{k}": v for k, v in eva_shapes.items()})
    expected.update(
        {"llama_proj.weight": torch.Size([hidden, cfg.qformer.hidden_size]), "llama_proj.bias": torch.Size([hidden])}
    )
    sd = load_file(str(folder / "vision.safetensors"))
    unexpected, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
    if unexpected or missing:
        raise WeightsError(
            f"{folder}/vision.safetensors: missing {_names(missing) or 'none'}; unexpected {_names(unexpected) or 'none'}"
        )
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise WeightsError(
                f"{folder}/vision.safetensors: {k} has shape {tuple(sd[k].shape)}, expected {tuple(shape)}"
            )
    vision_sd = {k[len("visual_encoder.") :]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    proj = {k[len("llama_proj.") :]: v for k, v in sd.items() if k.startswith("llama_proj.")}
    qparts = {k: v for k, v in sd.items() if not k.startswith(("visual_encoder.", "llama_proj."))}
    llm = _load_llm(folder / "llm", opts)
    report = LoadReport(source="converted", lora="none")
    report.loaded["llm"] = len(llm.state_dict())
    model = _assemble(cfg, llm, vision_sd, qparts, proj, opts, report)
    report.seconds = time.perf_counter() - t0
    return model, cfg, report


def load_original(
    eva: str | Path,
    qformer: str | Path,
    llama: str | Path,
    checkpoint: str | Path,
    cfg: XrayGPTConfig,
    opts: LoadOptions,
    trust: bool = False,
) -> tuple[XrayGPT, LoadReport]:
    """``trust``: the ``trust_checkpoints`` setting (allow .pth files that hold Python objects)."""
    t0 = time.perf_counter()
    parts = read_original_parts(eva, qformer, llama, checkpoint, cfg, trust)
    llm = _load_llm(llama, opts)
    report = LoadReport(source="original", lora="none")
    report.ignored = parts["ignored"]
    report.loaded["llm"] = len(llm.state_dict())
    model = _assemble(cfg, llm, parts["vision"], parts["qformer"], parts["proj"], opts, report)
    report.seconds = time.perf_counter() - t0
    return model, report


def _assemble(cfg, llm, vision_sd: dict, qparts: dict, proj: dict, opts: LoadOptions, report: LoadReport) -> XrayGPT:
    hidden = llm.config.hidden_size
    with torch.device("meta"):
        model = XrayGPT(cfg, None, hidden)
    model.llm = llm
    dev = torch.device(opts.device)
    mixed = dev.type == "cuda" and opts.dtype in (torch.float16, torch.bfloat16)
    # the original halves only EVA's Conv2d/Linear weights; ln_vision, the Q-Former, the queries and llama_proj
    # stay fp32 and run under fp16 autocast on the GPU
    vis = {
        k: t.to(device=dev, dtype=opts.dtype if (not mixed or RE_EVA_MATMUL.search(k)) else torch.float32)
        for k, t in vision_sd.items()
    }
    model.visual_encoder.load_state_dict(vis, strict=True, assign=True)
    side = torch.float32 if mixed else opts.dtype
    q = {k[len("qformer.") :]: v.to(device=dev, dtype=side) for k, v in qparts.items() if k.startswith("qformer.")}
    model.qformer.load_state_dict(q, strict=True, assign=True)
    ln = {k[len("ln_vision.") :]: v.to(device=dev, dtype=side) for k, v in qparts.items() if k.startswith("ln_vision.")}
    model.ln_vision.load_state_dict(ln, strict=True, assign=True)
    model.query_tokens = torch.nn.Parameter(qparts["query_tokens"].to(device=dev, dtype=side), requires_grad=False)
    model.llama_proj.load_state_dict(
        {k: v.to(device=dev, dtype=side) for k, v in proj.items()}, strict=True, assign=True
    )
    model.vision_autocast = opts.dtype if mixed else None
    report.loaded.update(vision=len(vis), qformer=len(q) + len(ln) + 1, llama_proj=len(proj))
    model.eval()
    return model
