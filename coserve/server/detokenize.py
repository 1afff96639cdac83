"""Streaming text from token ids a few at a time without splitting characters.

Decoding each token alone breaks multi-byte characters and word-piece spacing; decoding the
whole sequence every step costs O(n^2). As vLLM does, decode a short window: the text of
ids[prefix:] minus the text of ids[prefix:read] is what is new, held back while it ends in
an incomplete character (U+FFFD)."""

from __future__ import annotations


class IncrementalDecoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # end of what has been emitted as text

    def add(self, new_ids: list[int], final: bool = False) -> str:
        """Text the new ids complete; with `final`, also whatever is still held back."""
        if self.tokenizer is None:
            return ""
        self.ids.extend(new_ids)
        if self.read == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        text = decode(self.ids[self.prefix :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]
