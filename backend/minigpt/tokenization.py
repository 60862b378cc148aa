"""Prompt construction and tokenisation exactly as the original (transformers 4.30 slow ``LlamaTokenizer``).

* Template: ``<s>[INST] <Img><ImageHere></Img> {text} [/INST]`` (no system prompt).
* Conversations follow the original demo's ``CONV_VISION_minigptv2`` (system ``""``, roles ``"<s>[INST] "`` and
  ``" [/INST]"``, separator ``""``, ``SeparatorStyle.SINGLE``): after one turn the prompt is
  ``<s>[INST] <Img><ImageHere></Img> {q1} [/INST]{a1}<s>[INST] {q2} [/INST]`` -- the answer follows ``[/INST]``
  with no space and no ``</s>``; the literal ``<s>`` of the next turn becomes the BOS id like the first one.
  The original's context is cut from the left to ``max_length - max_new_tokens`` (``MAX_LENGTH`` = 2000,
  ``Chat.answer_prepare``); ``left_truncation`` gives how much.
* The prompt is split at ``<ImageHere>``; each segment is tokenised separately, only the first with special
  tokens. The first segment starts with the literal ``<s>`` (the BOS special token) and gets another BOS
  prepended => the ids start ``[1, 1, ...]``.
* Legacy SentencePiece behaviour: every piece of text between special tokens is encoded on its own with the
  dummy prefix ``▁`` (so ``[INST]`` after ``<s>`` starts with ``▁[``) even though later Llama-2-chat folders say
  ``"legacy": false`` in tokenizer_config.json. We use SentencePiece directly, which is what the slow
  tokenizer did.
* Decoding: ``skip_special_tokens=True`` drops unk/bos/eos and the pad token ``$$`` (the original sets
  ``pad_token = "$$"``, which made it special); ``clean_up_tokenization_spaces`` as the folder says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

IMAGE_PLACEHOLDER = "<ImageHere>"
ROLES = ("<s>[INST] ", " [/INST]")  # CONV_VISION_minigptv2.roles
IMAGE_MESSAGE = "<Img>" + IMAGE_PLACEHOLDER + "</Img>"  # what Chat.upload_img puts in the first user message
TEMPLATE = ROLES[0] + IMAGE_MESSAGE + " {text}" + ROLES[1]
PAD_TOKEN = "$$"
MAX_LENGTH = 2000  # Chat(max_length=2000): prompt + new tokens


def build_prompt(instruction: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt for ``instruction`` after the earlier turns ``history`` ((instruction, answer) pairs, oldest
    first), as ``Conversation.get_prompt`` builds it: ``system + sep`` then ``role + message + sep`` per message,
    the image in the first user message followed by one space (``Chat.ask``), the last assistant message empty."""
    turns = [*history, (instruction, None)]
    out = ""  # system "" + sep ""
    for i, (question, answer) in enumerate(turns):
        message = f"{IMAGE_MESSAGE} {question}" if i == 0 else question
        out += ROLES[0] + message + ROLES[1]
        if answer is not None:
            out += answer
    return out


def left_truncation(prompt_tokens: int, max_new_tokens: int, max_length: int = MAX_LENGTH) -> int:
    """How many leading prompt positions the original drops (``begin_idx = max(0, len + max_new - max_length)``;
    image embeddings count as positions)."""
    return max(0, prompt_tokens + max_new_tokens - max_length)


def _clean_up_tokenization(s: str) -> str:
    """transformers' ``clean_up_tokenization`` (used when clean_up_tokenization_spaces is true)."""
    return (
        s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


class MiniGPTTokenizer:
    def __init__(self, folder: str | Path):
        import sentencepiece as spm

        folder = Path(folder)
        model_file = folder / "tokenizer.model"
        if not model_file.is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer.model (the SentencePiece model of LLaMA-2)")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        cfg = {}
        if (folder / "tokenizer_config.json").is_file():
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
        self.clean_up_spaces = bool(cfg.get("clean_up_tokenization_spaces", True))  # 4.30 default: True
        self.unk_id, self.bos_id, self.eos_id = self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()
        self.specials = {self.sp.id_to_piece(i): i for i in (self.unk_id, self.bos_id, self.eos_id) if i >= 0}
        self._split = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self.specials, key=len, reverse=True)) + ")"
        )
        pad = self.sp.piece_to_id(PAD_TOKEN)
        self.pad_id = pad  # = unk if '$$' is not one piece (as in 4.30: unknown token -> unk id)
        self.skip_ids = {i for i in (self.unk_id, self.bos_id, self.eos_id, self.pad_id) if i is not None and i >= 0}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool) -> list[int]:
        """Slow-tokenizer legacy encoding: special tokens matched literally, every other chunk SentencePiece-encoded
        on its own (with the dummy prefix)."""
        ids = [self.bos_id] if add_bos else []
        for chunk in self._split.split(text):
            if not chunk:
                continue
            if chunk in self.specials:
                ids.append(self.specials[chunk])
            else:
                ids.extend(self.sp.encode(chunk))
        return ids

    def prompt_segments(self, prompt: str) -> list[list[int]]:
        """Ids of the text segments around each ``<ImageHere>``; the first with BOS (=> double BOS)."""
        return [self.encode(seg, add_bos=(i == 0)) for i, seg in enumerate(prompt.split(IMAGE_PLACEHOLDER))]

    def decode(self, ids: list[int]) -> str:
        """``decode(ids, skip_special_tokens=True)`` of the 4.30 slow tokenizer."""
        text = self.sp.decode([int(i) for i in ids if int(i) not in self.skip_ids])
        return _clean_up_tokenization(text) if self.clean_up_spaces else text


def postprocess_benchmark(text: str) -> str:
    """``MiniGPTBase.generate`` post-processing (evaluation / greedy path)."""
    text = text.split("</s>")[0]
    text = text.replace("<s>", "")
    return text.split("[/INST]")[-1].strip()


def postprocess_demo(text: str) -> str:
    """``Chat.answer`` / the demo's streaming post-processing."""
    return text.split("###")[0].split("Assistant:")[-1].strip()
