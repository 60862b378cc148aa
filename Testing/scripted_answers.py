"""Scripted answers for tiny random models: a transformers ``sequence_bias`` (saved in a model folder's
``generation_config.json``) that makes greedy decoding write a given text. The real engine, tokenizer, ``generate()``
and decoders run; only the words are chosen by the test."""

from __future__ import annotations


def script_bias(ids: list[int], eos_id: int | None) -> list:
    """A transformers ``sequence_bias`` that makes greedy decoding write ``ids`` (then ``eos_id``): the k-th token gets
    a bias growing with k when the k-1 tokens before it are the script's, so the longest matching prefix wins."""
    seq = [*ids, eos_id] if eos_id is not None else list(ids)
    return [[seq[: k + 1], 100.0 * (k + 1)] for k in range(len(seq))]
