"""XrayGPT's conversation template, stop words and answer post-processing, as its demo builds them.

Sources (mbzuai-oryx/XrayGPT @ d0baa6a): ``xraygpt/conversation/conversation.py`` (``CONV_VISION``, ``Chat.ask``,
``Chat.upload_img``, ``Chat.answer``, ``Chat.get_context_emb``) and ``demo.py`` (which uses ``CONV_VISION``).

* ``CONV_VISION``: ``SeparatorStyle.SINGLE``, ``sep="###"``, roles ``Patient`` / ``Doctor``, the system text below.
  ``upload_img`` appends ``("Patient", "<Img><ImageHere></Img>")``, ``ask`` joins the question to it with one space,
  ``answer`` appends ``("Doctor", None)``; ``get_prompt`` gives::

      {system}###Patient: <Img><ImageHere></Img> {question}###Doctor:

* The prompt is split at ``<ImageHere>``; each piece is tokenised by the slow (legacy SentencePiece) LLaMA tokenizer
  on its own, BOS only on the first (one BOS: the text has no literal ``<s>``); the 32 image embeddings go between.
* Generation stops when the last tokens are ``###``, which LLaMA's vocabulary spells two ways: ``[835]`` (``▁###``)
  and ``[2277, 29937]`` (``##`` ``#``); ``stop_sequences`` derives both from the tokenizer's pieces.
* Answer: leading ``<unk>``/``<s>`` dropped, ``split('###')[0]``, ``split('Doctor:')[-1].strip()``, then
  ``ChatDoctor``/``Chat Doctor`` -> ``XrayGPT``. (The original decodes without skipping special tokens, so an answer
  that ended on ``</s>`` showed it; ours drops it.)
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<ImageHere>"
SYSTEM = (
    "You are an experienced Doctor, give the following medical scan: <Img>ImageContent</Img>. "
    "You will be able to see the medical scan once I provide it to you. Please answer my questions."
)
SEP = "###"
ROLES = ("Patient", "Doctor")
#: the first of the demo's example prompts (= the first line of prompts/alignment.txt)
REPORT_PROMPT = "Describe the given chest x-ray image in detail."


def build_prompt(question: str) -> str:
    """The demo's single-turn prompt for one image and one question."""
    user = f"<Img>{IMAGE_PLACEHOLDER}</Img> {question}"
    return f"{SYSTEM}{SEP}{ROLES[0]}: {user}{SEP}{ROLES[1]}:"


def stop_sequences(tok) -> list[list[int]]:
    """The token-id spellings of ``###`` that end an answer: ``[835]`` (``▁###``) and ``[2277, 29937]`` (``##``
    ``#``) for LLaMA, as the demo hard-codes them; a vocabulary that also has a bare ``###`` piece (not LLaMA's) gets
    that one too."""
    sp = tok.sp
    unk = sp.unk_id()
    out = []
    for pieces in (["▁###"], ["##", "#"], ["###"]):
        ids = [sp.piece_to_id(p) for p in pieces]
        if all(i != unk for i in ids):
            out.append(ids)
    return out


def postprocess(text: str) -> str:
    text = text.split(SEP)[0]
    text = text.split(f"{ROLES[1]}:")[-1].strip()
    return text.replace("ChatDoctor", "XrayGPT").replace("Chat Doctor", "XrayGPT")
