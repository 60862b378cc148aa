"""A tiny MedMO: the tiny Qwen3-VL of ``peer_fixtures`` (MedMO is ``Qwen3VLForConditionalGeneration``, loaded from a
local folder exactly like MBZUAI/MedMO-4B), whose ``generation_config.json`` carries a transformers
``sequence_bias`` that scripts the greedy answer: the real engine, processor, ``generate()`` and decoder run, and the
answer is the one given."""

from __future__ import annotations

from pathlib import Path

from peer_fixtures import scripted_peer


def scripted_medmo(answer: str) -> Path:
    """A copy of the tiny Qwen3-VL folder, named MedMO-4B, that answers ``answer`` to any prompt (greedy)."""
    return scripted_peer("qwen3_vl", answer, name="MedMO-4B")
