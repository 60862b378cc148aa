"""Strict loading of the files LLaVA-Rad's authors release (microsoft/LLaVA-Rad @ 1fc4409, ``llava/model/builder.py``
``load_pretrained_model`` with ``model_base`` and a ``llavarad`` model name, and ``open_clip_encoder.py``):

* the LLaVA-Rad folder (``--model``, the HF repo ``microsoft/llava-rad``):
  ``config.json`` (``config.py``); ``adapter_config.json`` + ``adapter_model.safetensors``/``.bin`` (a peft LoRA
  over the base LLM, keys ``base_model.model.model.layers.N.{self_attn,mlp}.P.lora_{A,B}.weight``);
  ``non_lora_trainables.bin`` (the projector, ``base_model.model.model.mm_projector.*``; the builder strips
  ``base_model.`` and then ``model.`` from ``model.model.``); the open_clip tower config and checkpoint
  (``biomedclipcxr_518.json``, ``biomedclipcxr_518_checkpoint.pt``: an open_clip checkpoint, optionally wrapped in
  ``state_dict`` and prefixed ``module.``, as open_clip's ``load_state_dict`` reads it);
* the base LLM folder (``--llama``: ``lmsys/vicuna-7b-v1.5``, ``scripts/eval.sh``): a plain LLaMA folder with
  ``tokenizer.model``.

The LoRA is merged into the base weights (``W += alpha/r * B @ A``; ``alpha/sqrt(r)`` with ``use_rslora``), as the
builder's ``merge_and_unload`` does. Every expected tensor is loaded once; a missing, unknown, duplicated or
mis-shaped tensor is an error naming it. Deliberately ignored (reported): the tower checkpoint's text tower,
``logit_scale``, open_clip's ``visual.head`` and the trunk's final ``norm`` (never on LLaVA-Rad's path).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch

from backend.minigpt.weights import LoadOptions, LoadReport, WeightsError, _load_llm, _names, torch_load

from .config import LlavaRadConfig
from .model import LlavaRad

RE_LORA = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)(?:\.default)?\.weight$"
)
TOWER_IGNORED = (
    re.compile(r"^text\."),
    re.compile(r"^logit_(scale|bias)$"),
    re.compile(r"^visual\.head\."),
    re.compile(r"^visual\.trunk\.(norm|fc_norm|head)\.(weight|bias)$"),
)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _plain_state(obj, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = _names(obj.keys()) if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(f"{path}: expected {what} (a dict of tensors), found {keys or 'nothing'}")
    return obj


def check_tensors(
    part: str, src: str, got: dict[str, torch.Tensor], expected: dict[str, torch.Size], prefix: str, hint: str = ""
) -> None:
    """Strict loading: ``got`` holds every tensor of ``expected``, nothing else, each of its shape (``prefix``: the
    names' prefix in ``src``, for the message; ``hint``: appended to a shape error)."""
    missing = sorted(set(expected) - set(got))
    if missing:
        raise WeightsError(f"{src}: missing {part} tensors: {_names([prefix + m for m in missing])}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise WeightsError(f"{src}: unexpected {part} tensors: {_names([prefix + m for m in extra])}")
    for k, shape in expected.items():
        if tuple(got[k].shape) != tuple(shape):
            raise WeightsError(f"{src}: {prefix}{k} has shape {tuple(got[k].shape)}, expected {tuple(shape)}{hint}")


def load_tower(path: Path, expected: dict[str, torch.Size], trust: bool = False) -> tuple[dict, list[str]]:
    """open_clip checkpoint -> {trunk parameter name: tensor} for ``ViTTrunk``, ignored keys."""
    sd = _plain_state(torch_load(path, trust), path, "an open_clip checkpoint of the vision tower")
    if next(iter(sd)).startswith("module."):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if not any(k.startswith("visual.trunk.") for k in sd):
        hint = ""
        if any(k.startswith(("model.layers.", "base_model.")) for k in sd):
            hint = " (this looks like LLM weights, not the BiomedCLIP-CXR tower)"
        raise WeightsError(f"{path}: no visual.trunk.* tensors: not an open_clip timm-ViT checkpoint{hint}")
    out: dict[str, torch.Tensor] = {}
    ignored, unexpected = [], []
    for k, t in sd.items():
        name = k[len("visual.trunk.") :] if k.startswith("visual.trunk.") else None
        if any(p.match(k) for p in TOWER_IGNORED):
            ignored.append(k)
        elif name is not None and name in expected:
            out[name] = t
        else:
            unexpected.append(k)
    if unexpected:
        raise WeightsError(f"{path}: unexpected keys for the vision tower: {_names(unexpected)}")
    hint = " (does the tower config match this checkpoint?)"
    check_tensors("vision tower", str(path), out, expected, "visual.trunk.", hint)
    return out, ignored


def load_projector(path: Path, expected: dict[str, torch.Size], trust: bool = False) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"{path.parent}: no non_lora_trainables.bin (the projector of LLaVA-Rad)")
    sd = _plain_state(torch_load(path, trust), path, "the projector weights")
    # the builder: strip 'base_model.', then 'model.' when keys start 'model.model.'
    sd = {(k[len("base_model.") :] if k.startswith("base_model.") else k): v for k, v in sd.items()}
    if any(k.startswith("model.model.") for k in sd):
        sd = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in sd.items()}
    out, unexpected = {}, []
    for k, t in sd.items():
        name = k[len("model.mm_projector.") :] if k.startswith("model.mm_projector.") else None
        if name is not None and name in expected:
            out[name] = t
        else:
            unexpected.append(k)
    if unexpected:
        raise WeightsError(f"{path}: unexpected keys (only model.mm_projector.* expected): {_names(unexpected)}")
    check_tensors("projector", str(path), out, expected, "model.mm_projector.")
    return out


def read_lora(folder: Path, n_layers: int, shapes: dict[str, tuple[int, int]], trust: bool = False):
    """adapter_config.json + adapter weights -> ({(layer, 'self_attn.q_proj'): (A, B)}, scale)."""
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{folder}: no adapter_config.json (LLaVA-Rad's LoRA over the base LLM)")
    ac = json.loads(cfg_path.read_text(encoding="utf-8"))
    if ac.get("peft_type", "LORA") != "LORA" or ac.get("bias", "none") != "none" or ac.get("fan_in_fan_out"):
        raise WeightsError(f"{cfg_path}: only a plain LoRA (peft_type LORA, bias none, no fan_in_fan_out) is served")
    targets = ac.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise WeightsError(f"{cfg_path}: target_modules must be a list of module names, found {targets!r}")
    r, alpha = int(ac["r"]), float(ac["lora_alpha"])
    scale = alpha / math.sqrt(r) if ac.get("use_rslora") else alpha / r
    wfile = next((folder / n for n in ADAPTER_FILES if (folder / n).is_file()), None)
    if wfile is None:
        raise WeightsError(f"{folder}: no {' or '.join(ADAPTER_FILES)}")
    if wfile.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(wfile))
    else:
        sd = _plain_state(torch_load(wfile, trust), wfile, "the LoRA adapter")
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unexpected = []
    for k, t in sd.items():
        m = RE_LORA.match(k)
        if (
            not m
            or int(m.group(1)) >= n_layers
            or m.group(3) not in targets
            or f"{m.group(2)}.{m.group(3)}" not in shapes
        ):
            unexpected.append(k)
            continue
        slot = found.setdefault((int(m.group(1)), f"{m.group(2)}.{m.group(3)}"), {})
        if m.group(4) in slot:
            raise WeightsError(f"{wfile}: {k} is given twice")
        slot[m.group(4)] = t
    if unexpected:
        raise WeightsError(f"{wfile}: unexpected keys for a LoRA over {n_layers} LLaMA layers: {_names(unexpected)}")
    wanted = {(i, mod) for i in range(n_layers) for mod in shapes if mod.split(".")[1] in targets}
    missing = [
        f"layers.{i}.{mod}.lora_{ab}" for i, mod in sorted(wanted) for ab in "AB" if ab not in found.get((i, mod), {})
    ]
    if missing:
        raise WeightsError(f"{wfile}: missing LoRA tensors: {_names(missing)}")
    out = {}
    for (i, mod), ab in found.items():
        out_f, in_f = shapes[mod]
        a, b = ab["A"], ab["B"]
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise WeightsError(
                f"{wfile}: layers.{i}.{mod} LoRA A {tuple(a.shape)} / B {tuple(b.shape)}, expected ({r}, {in_f}) / "
                f"({out_f}, {r}) (r={r} from adapter_config.json; is --llama the base this LoRA was trained on?)"
            )
        out[(i, mod)] = (a, b)
    return out, scale


def merge_lora(llm, lora: dict, scale: float) -> int:
    with torch.no_grad():
        for (i, mod), (a, b) in lora.items():
            lin = llm.model.layers[i].get_submodule(mod)
            delta = (b.float() @ a.float()) * scale
            lin.weight.copy_((lin.weight.float() + delta.to(lin.weight.device)).to(lin.weight.dtype))
    return len(lora) * 2


def _check_llm(llm, cfg_json: dict, folder: Path, base: Path) -> None:
    c = llm.config
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if key in cfg_json and int(cfg_json[key]) != int(getattr(c, key)):
            raise WeightsError(
                f"{base}: {key} {getattr(c, key)} but {folder}/config.json says {cfg_json[key]}: --llama must be the "
                "base LLM this LLaVA-Rad was trained on (lmsys/vicuna-7b-v1.5)"
            )


def load_llava_rad(
    folder: str | Path, base: str | Path, cfg: LlavaRadConfig, opts: LoadOptions
) -> tuple[LlavaRad, LoadReport]:
    t0 = time.perf_counter()
    folder, base = Path(folder), Path(base)
    if not (base / "config.json").is_file():
        raise WeightsError(f"--llama {base}: not a Hugging Face LLaMA folder (no config.json)")
    cfg_json = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        skeleton = LlavaRad(cfg, None)
    tower_shapes = {k: v.shape for k, v in skeleton.vision_tower.state_dict().items()}
    proj_shapes = {k: v.shape for k, v in skeleton.mm_projector.state_dict().items()}
    tower, ignored = load_tower(Path(cfg.tower_checkpoint_file), tower_shapes, opts.trust_checkpoints)
    proj = load_projector(folder / "non_lora_trainables.bin", proj_shapes, opts.trust_checkpoints)
    if opts.quantize != "none":
        raise WeightsError("LLaVA-Rad's LoRA is merged into the base weights at load; --quantize is not supported")
    llm = _load_llm(base, opts)
    _check_llm(llm, cfg_json, folder, base)
    layer0 = llm.model.layers[0]
    shapes = {
        f"{part}.{n}": (int(m.out_features), int(m.in_features))
        for part in ("self_attn", "mlp")
        for n, m in layer0.get_submodule(part).named_children()
        if isinstance(m, torch.nn.Linear)
    }
    lora, scale = read_lora(folder, len(llm.model.layers), shapes, opts.trust_checkpoints)
    report = LoadReport(source="original", lora="merged")
    report.loaded["lora"] = merge_lora(llm, lora, scale)
    report.loaded["llm"] = len(llm.state_dict())
    report.ignored = {"vision_tower": ignored}
    with torch.device("meta"):
        model = LlavaRad(cfg, None)
    model.llm = llm
    dev = torch.device(opts.device)
    model.vision_tower.load_state_dict(
        {k: v.to(device=dev, dtype=opts.dtype) for k, v in tower.items()}, strict=True, assign=True
    )
    model.mm_projector.load_state_dict(
        {k: v.to(device=dev, dtype=opts.dtype) for k, v in proj.items()}, strict=True, assign=True
    )
    report.loaded.update(vision_tower=len(tower), mm_projector=len(proj))
    model.eval()
    report.seconds = time.perf_counter() - t0
    return model, report
