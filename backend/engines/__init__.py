"""Engines and how one is chosen. Heavy libraries are imported only by the engine that needs them."""

from __future__ import annotations

import argparse
import logging
import os

from .base import Engine

log = logging.getLogger("minigptmed.engines")

ENGINE_NAMES = ("auto", "builtin", "minigptmed", "hf", "openai")


def choose_engine(args: argparse.Namespace) -> tuple[str, str]:
    """Resolve ``--engine auto``: a configured VLM whose weights exist locally, else the built-in engine.
    Returns (engine name, reason)."""
    name = args.engine
    if name != "auto":
        return name, "chosen with --engine"
    converted = getattr(args, "converted", None)
    if converted and os.path.isdir(converted):
        return "minigptmed", f"converted MiniGPT-Med weights found at {converted}"
    files: list[str] = [f for f in (getattr(args, k, None) for k in ("eva", "llama", "checkpoint")) if f]
    if len(files) == 3:
        missing = [f for f in files if not os.path.exists(f)]
        if not missing:
            return "minigptmed", "MiniGPT-Med weights (--eva, --llama, --checkpoint) found"
        log.warning("auto: MiniGPT-Med configured but missing %s", ", ".join(missing))
    model = getattr(args, "model", None)
    if model and getattr(args, "url", None):
        return "openai", f"an OpenAI-compatible server is configured at {args.url}"
    if model and os.path.isdir(model):
        return "hf", f"a transformers model folder was found at {model}"
    return "builtin", "no VLM weights configured or found locally"


def build_engine(args: argparse.Namespace) -> Engine:
    name, reason = choose_engine(args)
    log.info("engine: %s (%s)", name, reason)
    if name == "builtin":
        from .builtin import BuiltinEngine

        return BuiltinEngine()
    if name == "minigptmed":
        from .minigptmed import MiniGPTMedEngine

        return MiniGPTMedEngine.from_args(args)
    if name == "hf":
        from .hf import HFEngine

        return HFEngine.from_args(args)
    if name == "openai":
        from .openai_engine import OpenAIEngine

        return OpenAIEngine.from_args(args)
    raise SystemExit(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
