"""Engines and how one is chosen. Heavy libraries are imported only by the engine that needs them."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ..setting_error import SettingError
from .base import Engine

if TYPE_CHECKING:
    from ..settings import EngineSettings

log = logging.getLogger("minigptmed.engines")

ENGINE_NAMES = ("auto", "builtin", "minigptmed", "xraygpt", "llava", "hf", "openai")


def choose_engine(settings: EngineSettings) -> tuple[str, str]:
    """Resolve ``engine="auto"``: a configured VLM whose weights exist locally, else the built-in engine.
    Returns (engine name, reason)."""
    name = settings.engine
    if name != "auto":
        return name, "named by the engine setting"
    m = settings.minigptmed
    if m.converted and os.path.isdir(m.converted):
        return "minigptmed", f"converted MiniGPT-Med weights found at {m.converted}"
    files: list[str] = [f for f in (m.eva, m.llama, m.checkpoint) if f]
    if len(files) == 3:
        missing = [f for f in files if not os.path.exists(f)]
        if not missing:
            return "minigptmed", "MiniGPT-Med weights (eva, llama, checkpoint) found"
        log.warning("auto: MiniGPT-Med configured but missing %s", ", ".join(missing))
    if settings.openai.model and settings.openai.url:
        return "openai", f"an OpenAI-compatible server is configured at {settings.openai.url}"
    lv = settings.llava
    if settings.hf.family in ("llava_rad", "bimedix2") and lv.model and os.path.isdir(lv.model):
        return "llava", f"--family {settings.hf.family}: a LLaVA model folder was found at {lv.model}"
    if settings.hf.model and os.path.isdir(settings.hf.model):
        return "hf", f"a transformers model folder was found at {settings.hf.model}"
    return "builtin", "no VLM weights configured or found locally"


def build_engine(settings: EngineSettings) -> Engine:
    name, reason = choose_engine(settings)
    log.info("engine: %s (%s)", name, reason)
    if name == "builtin":
        from .builtin import BuiltinEngine

        return BuiltinEngine(settings.builtin)
    if name == "minigptmed":
        from .minigptmed import MiniGPTMedEngine

        return MiniGPTMedEngine(settings.minigptmed)
    if name == "xraygpt":
        from .xraygpt import XrayGPTEngine

        return XrayGPTEngine(settings.xraygpt)
    if name == "llava":
        from .llava import LlavaEngine

        return LlavaEngine(settings.llava)
    if name == "hf":
        from .hf import HFEngine

        return HFEngine(settings.hf)
    if name == "openai":
        from .openai_engine import OpenAIEngine

        return OpenAIEngine(settings.openai)
    raise SettingError(f"unknown {{engine}} {name!r}; choose one of {', '.join(ENGINE_NAMES)}", "engine")
