"""A tiny MedMO: the tiny Qwen3-VL of ``peer_fixtures`` (MedMO is ``Qwen3VLForConditionalGeneration``, loaded from a
local folder exactly like MBZUAI/MedMO-4B), whose ``generation_config.json`` carries a transformers
``sequence_bias`` that scripts the greedy answer: the real engine, processor, ``generate()`` and decoder run, and the
answer is the one given."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from peer_fixtures import peer_model
from scripted_answers import script_bias

_CACHE: dict[str, Path] = {}


def scripted_medmo(answer: str) -> Path:
    """A copy of the tiny Qwen3-VL folder that answers ``answer`` to any prompt (greedy)."""
    if answer not in _CACHE:
        from transformers import AutoTokenizer, GenerationConfig

        dst = Path(tempfile.mkdtemp(prefix="medmo-tiny-")) / "MedMO-4B"
        shutil.copytree(peer_model("qwen3_vl"), dst)
        tok = AutoTokenizer.from_pretrained(dst, local_files_only=True)
        ids = tok(answer, add_special_tokens=False).input_ids
        assert tok.decode(ids, skip_special_tokens=True) == answer
        gc = GenerationConfig.from_pretrained(dst, local_files_only=True)
        gc.sequence_bias = script_bias(ids, tok.eos_token_id)
        gc.save_pretrained(dst)
        _CACHE[answer] = dst
    return _CACHE[answer]
