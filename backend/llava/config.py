"""Typed configuration of LLaVA-Rad (microsoft/LLaVA-Rad @ 1fc4409, a LLaVA-1.5 fork), read from the files its
authors release; nothing here is guessed from the model's name.

* ``config.json`` of the LLaVA-Rad folder (``LlavaConfig(LlamaConfig)``, ``model_type`` ``"llava"`` in
  ``llava/model/language_model/llava_llama.py``): the LLM's dimensions plus the ``mm_*`` keys that
  ``llava/model/llava_arch.py:initialize_vision_modules`` writes: ``mm_vision_tower``, ``mm_vision_tower_config``,
  ``mm_vision_tower_checkpoint``, ``mm_hidden_size``, ``mm_projector_type`` (``scripts/finetune_lora.sh``:
  ``mlp2x_gelu``), ``mm_vision_select_layer`` (``-2``), ``mm_vision_select_feature`` (default ``"patch"``),
  ``mm_use_im_start_end`` / ``mm_use_im_patch_token`` (both ``False`` in the scripts).
* the open_clip model config of the vision tower (``biomedclipcxr_518.json``, fetched from the HF repo by
  ``open_clip_encoder.py`` when the training path in ``mm_vision_tower_config`` does not exist): its
  ``vision_cfg.timm_model_name`` names the timm ViT trunk and ``vision_cfg.image_size`` its input size; an optional
  ``preprocess_cfg`` gives mean/std (open_clip's default otherwise: the OpenAI CLIP values).

The timm trunks we can build are in ``TIMM_TRUNKS`` (the timm definitions of those names); any other name is an
error naming it. A ``--model-config`` JSON file may instead give the trunk's dimensions (tiny test models)::

    {"vision": {"width": 32, "depth": 2, "heads": 2, "patch_size": 8, "image_size": 32, "layer_scale": true}}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class LlavaConfigError(ValueError):
    """A LLaVA folder whose configuration we cannot serve; the message names the file and the key."""


@dataclass(frozen=True)
class TrunkConfig:
    """A timm ``VisionTransformer`` trunk as LLaVA-Rad runs it (class token, learned absolute positions over
    class token + patches, pre-norm blocks with qkv bias, GELU MLP, LayerNorm eps 1e-6)."""

    width: int = 768
    depth: int = 12
    heads: int = 12
    patch_size: int = 16
    image_size: int = 224
    mlp_ratio: float = 4.0
    layer_scale: bool = False  # timm ``init_values`` set: ``ls1.gamma`` / ``ls2.gamma`` per block
    eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


#: timm model names -> their definitions in timm.models.vision_transformer (``vit_base_patch16_224``: BiomedCLIP's
#: trunk; ``vit_base_patch14_dinov2``: ``init_values=1e-5``, i.e. LayerScale). The image size comes from the
#: open_clip config, as open_clip passes ``img_size`` to timm.
TIMM_TRUNKS: dict[str, TrunkConfig] = {
    "vit_base_patch16_224": TrunkConfig(patch_size=16, image_size=224),
    "vit_base_patch16_384": TrunkConfig(patch_size=16, image_size=384),
    "vit_base_patch14_dinov2": TrunkConfig(patch_size=14, image_size=518, layer_scale=True),
}


@dataclass(frozen=True)
class LlavaRadConfig:
    trunk: TrunkConfig
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mm_hidden_size: int
    hidden_size: int
    projector_type: str  # "linear" or "mlp{N}x_gelu"
    select_layer: int  # index into [embeddings, block 1, ..., block depth]
    select_feature: str  # "patch" (drop CLS) or "cls_patch"
    tower_name: str
    tower_config_file: str
    tower_checkpoint_file: str
    name: str = "LLaVA-Rad"

    @property
    def blocks_used(self) -> int:
        """Blocks whose output reaches the projector (``hidden_states[select_layer]``)."""
        return select_index(self.select_layer, self.trunk.depth)

    @property
    def image_tokens(self) -> int:
        return self.trunk.grid**2 + (1 if self.select_feature == "cls_patch" else 0)


def select_index(select_layer: int, depth: int) -> int:
    """``mm_vision_select_layer`` as an index into ``hidden_states`` of a ``depth``-layer tower (embeddings, layer 1,
    ..., layer depth): negative counts from the end."""
    return select_layer if select_layer >= 0 else depth + 1 + select_layer


def check_no_image_tokens(c: dict[str, Any], cfg_path: Path, trained: str) -> None:
    """LLaVA's image start/end and patch tokens are off (``trained``: who trains that way, for the message)."""
    if c.get("mm_use_im_start_end") or c.get("mm_use_im_patch_token"):
        raise LlavaConfigError(
            f"{cfg_path}: mm_use_im_start_end / mm_use_im_patch_token are set; {trained} "
            "and this engine serves only that layout"
        )


def read_projector_keys(c: dict[str, Any], cfg_path: Path) -> tuple[str, str]:
    """config.json's ``mm_projector_type`` (``linear`` or ``mlpNx_gelu``) and ``mm_vision_select_feature``."""
    ptype = str(c.get("mm_projector_type", "linear"))
    if ptype != "linear" and not (ptype.startswith("mlp") and ptype.endswith("x_gelu") and ptype[3:-6].isdigit()):
        raise LlavaConfigError(f"{cfg_path}: mm_projector_type {ptype!r} is not linear or mlpNx_gelu")
    feature = str(c.get("mm_vision_select_feature", "patch"))
    if feature not in ("patch", "cls_patch"):
        raise LlavaConfigError(f"{cfg_path}: mm_vision_select_feature {feature!r} is not patch or cls_patch")
    return ptype, feature


def read_widths(c: dict[str, Any], cfg_path: Path, tower: str, width: int) -> tuple[int, int, int]:
    """config.json's ``mm_hidden_size`` (which must be ``width``, the tower's), ``hidden_size`` and
    ``mm_vision_select_layer``."""
    try:
        mm_hidden, hidden, layer = int(c["mm_hidden_size"]), int(c["hidden_size"]), int(c["mm_vision_select_layer"])
    except KeyError as e:
        raise LlavaConfigError(f"{cfg_path}: missing {e.args[0]}") from e
    if mm_hidden != width:
        raise LlavaConfigError(f"{cfg_path}: mm_hidden_size {mm_hidden} but the tower {tower} is {width} wide")
    return mm_hidden, hidden, layer


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise LlavaConfigError(f"{path}: cannot read {what}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise LlavaConfigError(f"{path}: {what} is not JSON: {e}") from e
    if not isinstance(d, dict):
        raise LlavaConfigError(f"{path}: {what} is not a JSON object")
    return d


def _tower_file(folder: Path, configured: str | None, default: str, key: str) -> Path:
    """The tower file inside the LLaVA-Rad folder: the configured path if it exists, else its base name in the
    folder (the HF layout), else ``default`` in the folder."""
    if configured:
        p = Path(configured)
        if p.is_absolute() and p.is_file():
            return p
        if (folder / p.name).is_file():
            return folder / p.name
    if (folder / default).is_file():
        return folder / default
    raise LlavaConfigError(
        f"{folder}: the vision tower file for config.json's {key} ({configured!r}) is not in the folder "
        f"(expected {Path(configured).name if configured else default})"
    )


def _trunk_from_open_clip(path: Path, override: dict[str, Any] | None) -> tuple[TrunkConfig, tuple, tuple]:
    oc = _read_json(path, "the open_clip vision tower config")
    vis = oc.get("vision_cfg")
    if not isinstance(vis, dict):
        raise LlavaConfigError(f"{path}: no 'vision_cfg' object (not an open_clip model config)")
    pre = oc.get("preprocess_cfg") or {}
    mean = tuple(float(v) for v in pre.get("mean", OPENAI_MEAN))
    std = tuple(float(v) for v in pre.get("std", OPENAI_STD))
    if len(mean) != 3 or len(std) != 3:
        raise LlavaConfigError(f"{path}: preprocess_cfg mean/std must have three values")
    if override is not None:
        bad = set(override) - {f.name for f in dataclasses.fields(TrunkConfig)}
        if bad:
            raise LlavaConfigError(f"unknown --model-config vision keys: {', '.join(sorted(bad))}")
        trunk = TrunkConfig(**override)
    else:
        name = vis.get("timm_model_name")
        if name not in TIMM_TRUNKS:
            known = ", ".join(sorted(TIMM_TRUNKS))
            raise LlavaConfigError(
                f"{path}: vision_cfg.timm_model_name {name!r} is not a trunk we can build (known: {known})"
            )
        size = vis.get("image_size", TIMM_TRUNKS[name].image_size)
        if not isinstance(size, int):
            raise LlavaConfigError(f"{path}: vision_cfg.image_size must be one integer, found {size!r}")
        trunk = dataclasses.replace(TIMM_TRUNKS[name], image_size=size)
    if trunk.image_size % trunk.patch_size or trunk.width % trunk.heads:
        raise LlavaConfigError(f"{path}: image_size must be a multiple of patch_size and width of heads")
    return trunk, mean, std  # type: ignore[return-value]


def read_config(folder: str | Path, model_config: str | Path | None = None) -> LlavaRadConfig:
    """The LLaVA-Rad folder's config.json + its tower config (+ an optional ``--model-config`` override)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise LlavaConfigError(f"{folder}: no config.json (pass the LLaVA-Rad folder, e.g. microsoft/llava-rad)")
    c = _read_json(cfg_path, "config.json")
    if "mm_vision_tower" not in c:
        raise LlavaConfigError(
            f"{cfg_path}: no mm_vision_tower: not a LLaVA config (a plain LLaMA folder goes to --llama)"
        )
    override = None
    if model_config:
        extra = _read_json(Path(model_config), "--model-config")
        bad = set(extra) - {"vision"}
        if bad:
            raise LlavaConfigError(f"unknown --model-config keys: {', '.join(sorted(bad))}")
        override = extra.get("vision")
    check_no_image_tokens(c, cfg_path, "LLaVA-Rad trains with both off")
    ptype, feature = read_projector_keys(c, cfg_path)
    tower_cfg = _tower_file(folder, c.get("mm_vision_tower_config"), "biomedclipcxr_518.json", "mm_vision_tower_config")
    tower_ckpt = _tower_file(
        folder, c.get("mm_vision_tower_checkpoint"), "biomedclipcxr_518_checkpoint.pt", "mm_vision_tower_checkpoint"
    )
    trunk, mean, std = _trunk_from_open_clip(tower_cfg, override)
    mm_hidden, hidden, layer = read_widths(c, cfg_path, tower_cfg.name, trunk.width)
    out = LlavaRadConfig(
        trunk=trunk,
        mean=mean,
        std=std,
        mm_hidden_size=mm_hidden,
        hidden_size=hidden,
        projector_type=ptype,
        select_layer=layer,
        select_feature=feature,
        tower_name=str(c["mm_vision_tower"]),
        tower_config_file=str(tower_cfg),
        tower_checkpoint_file=str(tower_ckpt),
    )
    if not 1 <= out.blocks_used <= trunk.depth:
        raise LlavaConfigError(f"{cfg_path}: mm_vision_select_layer {layer} selects no block of {trunk.depth}")
    return out
