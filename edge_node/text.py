"""Incremental detokenization for streaming.

Guarantee: the concatenation of every `push` result and the final `flush` equals
decode(all tokens). Text that ends inside an unfinished multi-byte character (decoded as
U+FFFD) is held back until the following tokens complete it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._sent = 0  # characters of the decoded text already handed out

    def push(self, tokens: Sequence[int]) -> str:
        self._tokens.extend(int(t) for t in tokens)
        text = self._decode(self._tokens)
        stable = len(text.rstrip("\ufffd"))
        if stable <= self._sent:
            return ""
        piece, self._sent = text[self._sent:stable], stable
        return piece

    def flush(self) -> str:
        text = self._decode(self._tokens)
        piece, self._sent = text[self._sent:], len(text)
        return piece
