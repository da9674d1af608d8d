"""Incremental detokenization for streaming, in linear time.

Guarantees, for a `decode` that joins the tokens' bytes and decodes them as UTF-8 with
replacement (byte-level BPE, as Qwen's), optionally dropping one leading space (SentencePiece):
- The concatenation of every `push` result and the final `flush` equals decode(all tokens).
- Only an unfinished multi-byte character at the end (decoded as U+FFFD) is held back, until the
  following tokens complete it; `flush` hands out whatever is left, as decode does.
- Each call decodes a bounded window, not the whole answer: the tokens of the piece handed out
  last (the context), the tokens held back (at most `_MAX_HELD` before a push looks for a settled
  point to cut at) and the new ones. The total work is linear in the number of tokens, except
  over a run of tokens that add no visible text (special tokens the decoder skips): such a run
  is held whole, as in vLLM, until a token adds text.

The technique is vLLM's and TGI's incremental detokenization. Tokens before `prefix` are never
decoded again; tokens[prefix:read] were handed out already and are decoded only as context, so
that a decoder that treats the start of its input specially (a leading space) sees the same
start as in the whole text. The text of the window past the context is what is new.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"
# A character has at most 4 bytes, so a character split over tokens that each carry bytes spans
# at most 4 of them; past that, a push looks for an earlier settled point to cut at.
_MAX_HELD = 4
_CUT_TRIES = 4  # cut points tried, from the newest token back


class TextStream:
    """Turns a stream of token ids into text pieces; one instance per answer."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._prefix = 0  # tokens before this index are settled and never decoded again
        self._read = 0  # tokens[prefix:read] were handed out; they are the context
        self._sent = 0  # characters past the context handed out while tokens are held

    def push(self, tokens: Sequence[int]) -> str:
        """Add tokens; returns the text they complete (may be empty)."""
        self._tokens.extend(int(t) for t in tokens)
        context, text = self._window()
        if len(text) > len(context) and not text.endswith(_REPLACEMENT):
            return self._advance(len(self._tokens), context, text)
        if len(self._tokens) - self._read > _MAX_HELD:
            return self._cut(context, text)
        if text.endswith(_REPLACEMENT):  # only the last character, unfinished, can still change
            return self._hand_out(text[:-1], context)
        return ""

    def flush(self) -> str:
        """The text still held back, unfinished characters included (as U+FFFD)."""
        context, text = self._window()
        return self._advance(len(self._tokens), context, text) if len(text) > len(context) else ""

    def _window(self) -> tuple[str, str]:
        window = self._tokens[self._prefix:]
        return self._decode(window[:self._read - self._prefix]), self._decode(window)

    def _hand_out(self, text: str, context: str) -> str:
        """`text` (the window's, up to a settled point) past what was handed out already."""
        piece = text[len(context) + self._sent:]
        self._sent += len(piece)
        return piece

    def _advance(self, end: int, context: str, text: str) -> str:
        """Hand out `text` (the window's up to token `end`); tokens[read:end] become the context.

        Callers advance only past tokens that added visible text: a context that is empty would
        let a decoder drop a leading space that is not at the start of the answer.
        """
        piece = self._hand_out(text, context)
        self._prefix, self._read, self._sent = self._read, end, 0
        return piece

    def _cut(self, context: str, text: str) -> str:
        """Many tokens are held: move the window up to the newest settled token boundary.

        A boundary is settled when decoding either side of it alone gives the same text as
        decoding across it, and the right side decodes to something: then its first bytes have
        already ended any character left open on the left, whatever tokens come later. The
        left side must add visible text, as every context must (see `_advance`).
        """
        if not text.endswith(_REPLACEMENT):  # nothing visible was added: keep holding
            return ""
        window = self._tokens[self._prefix:]
        lowest = max(self._read - self._prefix, len(window) - 1 - _CUT_TRIES)
        for cut in range(len(window) - 1, lowest, -1):
            head, tail = self._decode(window[:cut]), self._decode(window[cut:])
            if tail and head + tail == text and len(head) >= len(context) + max(self._sent, 1):
                return self._advance(self._prefix + cut, context, head)
        return self._hand_out(text[:-1], context)
