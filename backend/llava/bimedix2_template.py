"""BiMediX2's conversation, tokenisation and answer post-processing, as its authors' inference builds them.

Sources: ``mbzuai-oryx/BiMediX2`` @ 497a352 ``BiMed-MBench/bimedix_inference.py`` (its own ``conv_llama3``, the same as
``mbzuai-oryx/LLaVA-pp`` @ 5ccb07b ``LLaMA-3-V/conversation.py``; ``SeparatorStyle.MPT``, ``sep="<|eot_id|>"``) and
``haotian-liu/LLaVA`` @ 3e337ad ``llava/mm_utils.py:tokenizer_image_token``. ``gen_answer`` puts ``<image>\\n`` before
the question when it has none, appends the question as the user's message and an open assistant message;
``get_prompt`` (MPT) gives::

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{SYSTEM}<|eot_id|><|start_header_id|>user
    <|end_header_id|>\\n\\n<image>\\n{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n

(one line in reality). Earlier turns go in as the MPT style writes them: ``role + message + sep`` each.

* Tokenisation (``tokenizer_image_token``): the prompt is split at ``<image>``, each chunk tokenised by the folder's
  tokenizer (``AutoTokenizer``; Llama 3's is a fast one, which adds ``<|begin_of_text|>`` and reads the special tokens
  written in the text); the first chunk keeps its first token when it is BOS, every chunk loses its first token
  then, and the image goes between. With Llama 3.1's tokenizer the prompt thus starts with BOS twice: the one the
  tokenizer adds and the one written in the system text (the authors' code does exactly this; we keep it).
* Stop: ``<|eot_id|>`` (the MPT ``sep``, ``KeywordsStoppingCriteria``) and the folder's ``generation_config``
  EOS ids. Answer: decoded with special tokens skipped (``TextIteratorStreamer(skip_special_tokens=True)``), a
  trailing ``<|eot_id|>`` removed; we also strip surrounding whitespace.
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_TOKEN = "<image>"
SYSTEM = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n")
SEP = "<|eot_id|>"
#: ours (the authors publish no report prompt; BiMed-MBench's questions are free text): the project's wording
REPORT_PROMPT = "Describe this medical image in detail and list the findings."


def report_question(modality: str | None = None) -> str:
    return f"Describe this {modality} image in detail and list the findings." if modality else REPORT_PROMPT


def build_prompt(question: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """``conv_llama3.get_prompt()`` for the earlier (question, answer) turns and the new question; the image goes
    before the first question (``gen_answer``: ``<image>\\n`` + question); a literal ``<image>`` typed in a question is
    dropped (the authors' code would keep it there, and a second one would ask for a second image)."""
    turns: list[tuple[str, str | None]] = [*history, (question, None)]
    out = SYSTEM + SEP
    for k, (q, a) in enumerate(turns):
        q = q.replace(IMAGE_TOKEN, "").strip()  # one image per conversation, before the first question
        if k == 0:
            q = f"{IMAGE_TOKEN}\n{q}"
        out += ROLES[0] + q + SEP
        out += ROLES[1] + (a + SEP if a is not None else "")
    return out


def prompt_chunks(tokenizer, prompt: str) -> list[list[int]]:
    """Token ids of the text around each ``<image>``, as ``tokenizer_image_token`` joins them."""
    chunks = [list(tokenizer(c).input_ids) for c in prompt.split(IMAGE_TOKEN)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    return [chunks[0]] + [c[offset:] for c in chunks[1:]]


def stop_ids(tokenizer, generation_eos: int | Sequence[int] | None) -> list[int]:
    """``<|eot_id|>`` and the generation config's EOS ids (Llama 3.1 Instruct: 128001, 128008, 128009)."""
    ids = [int(i) for i in ([generation_eos] if isinstance(generation_eos, int) else generation_eos or [])]
    eot = tokenizer.convert_tokens_to_ids(SEP)
    if isinstance(eot, int) and eot != tokenizer.unk_token_id and eot not in ids:
        ids.append(eot)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the tokenizer has neither <|eot_id|> nor an EOS token")
    return ids


def postprocess(text: str) -> str:
    text = text.strip()
    if text.endswith(SEP):
        text = text[: -len(SEP)]
    return text.strip()
