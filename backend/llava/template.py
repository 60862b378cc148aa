"""LLaVA-Rad's conversation, tokenisation and answer post-processing, as its evaluation builds them.

Sources (microsoft/LLaVA-Rad @ 1fc4409): ``scripts/eval.sh`` (``conv_mode="v1"``), ``llava/conversation.py``
(``conv_templates["v1"] = conv_vicuna_v1``: ``SeparatorStyle.TWO``, ``sep=" "``, ``sep2="</s>"``, roles
``USER``/``ASSISTANT``), ``llava/eval/model_mimic_cxr.py`` (``q.replace("<image>", "").strip()``, then
``"<image>\\n" + q`` since ``mm_use_im_start_end`` is off; ``append_message(USER, q)``,
``append_message(ASSISTANT, None)``), ``llava/mm_utils.py:tokenizer_image_token`` and ``llava/utils.py``
(``data_loader_mimic_reason_findings``: the report prompts). ``get_prompt`` gives::

    {system} USER: <image>\\n{question} ASSISTANT:

* Tokenisation (``tokenizer_image_token``): the prompt is split at ``<image>``; every chunk is tokenised by the base
  LLM's slow ``LlamaTokenizer`` (``use_fast=False``; BOS added); the first chunk keeps its BOS, the later chunks lose
  theirs, and the image's features go where ``IMAGE_TOKEN_INDEX`` (-200) sits. The chunks hold no special tokens, so
  the legacy and non-legacy slow tokenizers agree with SentencePiece's ``encode`` (dummy prefix on every chunk: the
  second chunk starts ``▁`` ``<0x0A>``); we call SentencePiece directly.
* Answer: ``batch_decode(skip_special_tokens=True)``, ``strip()``, a trailing ``</s>`` (``sep2``) removed,
  ``strip()``.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
SEPS = (" ", "</s>")
#: llava/utils.py data_loader_mimic_reason_findings: without and with a reason for the exam
REPORT_PROMPT = "Provide a description of the findings in the radiology image."
REPORT_WITH_INDICATION = (
    "Provide a description of the findings in the radiology image given the following indication: {reason}"
)


def report_question(reason: str | None = None) -> str:
    reason = (reason or "").replace("\n", " ").strip()
    return REPORT_WITH_INDICATION.format(reason=reason) if reason else REPORT_PROMPT


def build_prompt(question: str) -> str:
    """``conv_vicuna_v1`` after one user message (image first) and an open assistant message."""
    q = IMAGE_TOKEN + "\n" + question.replace(IMAGE_TOKEN, "").strip()
    messages = [(ROLES[0], q), (ROLES[1], None)]
    out = SYSTEM + SEPS[0]
    for i, (role, msg) in enumerate(messages):
        out += f"{role}: {msg}{SEPS[i % 2]}" if msg else f"{role}:"
    return out


def prompt_chunks(sp, prompt: str, bos_id: int) -> list[list[int]]:
    """Token ids of the text around each ``<image>``: BOS on the first chunk only."""
    chunks = [list(sp.encode(c)) for c in prompt.split(IMAGE_TOKEN)]
    chunks[0] = [bos_id, *chunks[0]]
    return chunks


def postprocess(text: str) -> str:
    text = text.strip()
    if text.endswith(SEPS[1]):
        text = text[: -len(SEPS[1])]
    return text.strip()
