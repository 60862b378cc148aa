"""Answer text as it grows: turns successive full decodes of the tokens so far into deltas that never split a UTF-8
character (a trailing U+FFFD from an incomplete byte sequence is held back) and never show half a special token
(the decoders skip special tokens, so a delta only ever holds decoded text)."""

from __future__ import annotations

from .base import TextCallback


class DeltaText:
    def __init__(self, emit: TextCallback):
        self.emit = emit
        self.sent = ""

    def update(self, text: str) -> None:
        """``text``: the whole answer decoded so far. Emits what is new since the last call when it extends what
        was sent (a decode that rewrote earlier text is held until it extends it again)."""
        stable = text.rstrip("\ufffd")
        if len(stable) > len(self.sent) and stable.startswith(self.sent):
            delta = stable[len(self.sent) :]
            self.sent = stable
            self.emit(delta)

    def finish(self, text: str) -> None:
        """The final answer: emit the rest of it. When the decode rewrote text already sent, nothing more is emitted
        (the deltas would no longer add up; the final ``done`` event carries the whole answer)."""
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.emit(text[len(self.sent) :])
            self.sent = text
