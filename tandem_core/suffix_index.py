"""Retrieval drafts: a suffix automaton over the user's own token streams.

Answers that edit or quote text the user already has (refactor this, fix that, answer from my
note) repeat long spans of the prompt, the conversation or a document. Where the text generated
so far ends with a span that also occurs earlier, the tokens that followed that earlier
occurrence are a free draft (prompt-lookup decoding; SuffixDecoding, arXiv 2411.04975, does the
same with suffix trees over prompts and past outputs).

The index is a suffix automaton (Blumer et al. 1985): states are classes of substrings with the
same end positions, built online in amortized O(1) per token. It holds:
- documents (`add_document`): token streams fixed once added, each closed by a separator that
  matches nothing, so no match spans two sources;
- the live stream (`extend`): the prompt, then each committed token. Its suffix is what a
  lookup continues.

Guarantees:
- `propose(n)` returns the continuation of the longest suffix of the live stream that also
  ends somewhere earlier (its most recent earlier end; a document's or the live stream's own),
  with that suffix's length (`match_len`) and how many times it occurred (`occurrences`). It
  never crosses a separator, so a document's tail never runs into another source.
- Bounded memory: at most `max_tokens` tokens are indexed (about 2 states per token, each a
  small dict). Past that, `add_document` refuses (returns False) and `extend` keeps the live
  stream's lookups working by not indexing further (new tokens still move the match, which
  then only finds older text). `memory_estimate()` reports the bytes.
- Bounded time: each token costs amortized O(1) automaton work plus at most `walk` suffix-link
  steps to keep end positions and counts current; a lookup is O(walk + n).
  `occurrences` is exact while a string's suffix-link chain is shorter than `walk`, a lower
  bound otherwise.

Pure: integers and lists only; no I/O.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 1 << 17  # 131072 tokens: a long conversation plus a few documents
DEFAULT_WALK = 48


@dataclass(frozen=True)
class Proposal:
    """A retrieval draft."""

    tokens: tuple[int, ...]  # the continuation, at most the n asked for
    match_len: int           # length of the live stream's suffix that matched
    occurrences: int         # times that suffix occurred before (>= 1)
    from_live: bool          # the continuation comes from the live stream itself (else a document)


class SuffixIndex:
    """A suffix automaton over documents and one live stream (see the module doc)."""

    def __init__(self, *, max_tokens: int = DEFAULT_MAX_TOKENS, walk: int = DEFAULT_WALK) -> None:
        if max_tokens < 1 or walk < 1:
            raise ValueError("max_tokens and walk must be >= 1")
        self.max_tokens, self.walk = max_tokens, walk
        self._text: list[int] = []   # every indexed token, separators (negative ids) included
        self._next: list[dict[int, int]] = [{}]
        self._link: list[int] = [-1]
        self._len: list[int] = [0]
        self._last_end: list[int] = [-1]  # most recent end position of the state's strings
        self._prev_end: list[int] = [-1]  # the one before it
        self._occ: list[int] = [0]        # end positions seen (see the module doc)
        self._tail = 0                    # state of the whole text
        self._live_start = 0              # where the live stream begins in _text
        self._separators = 0
        self._live_len = 0                # live tokens, indexed or not
        self._state, self._match = 0, 0   # the live suffix's longest match: state and length
        self._overflow = False            # the live stream stopped being indexed

    @classmethod
    def over(cls, live: Sequence[int]) -> SuffixIndex:
        """An index whose live stream starts with `live` (a prompt: no documents)."""
        index = cls()
        index.extend(live)
        return index

    # -- building ----------------------------------------------------------------------------

    def add_document(self, tokens: Sequence[int]) -> bool:
        """Index a fixed token stream; False (nothing indexed) when it would pass the bound.

        Documents go in before the live stream starts: adding one later would split the live
        stream, so it raises.
        """
        if self._live_len:
            raise RuntimeError("add documents before the live stream starts")
        if len(self._text) + len(tokens) + 1 > self.max_tokens:
            return False
        for t in tokens:
            self._add(_check_token(t))
        self._separators += 1
        self._add(-self._separators)
        self._live_start = len(self._text)
        return True

    def extend(self, tokens: Sequence[int]) -> None:
        """Append committed tokens to the live stream and move the match."""
        for t in tokens:
            t = _check_token(t)
            self._live_len += 1
            if not self._overflow and len(self._text) < self.max_tokens:
                self._add(t)
                self._state, self._match = self._longest_repeat()
            else:
                self._overflow = True
                self._state, self._match = self._advance(self._state, self._match, t)

    def _add(self, c: int) -> None:
        """Standard online construction (extend by one symbol), then refresh end positions."""
        i = len(self._text)
        self._text.append(c)
        cur = self._new_state(self._len[self._tail] + 1, -1, -1, 0)
        p = self._tail
        while p != -1 and c not in self._next[p]:
            self._next[p][c] = cur
            p = self._link[p]
        if p == -1:
            self._link[cur] = 0
        else:
            q = self._next[p][c]
            if self._len[p] + 1 == self._len[q]:
                self._link[cur] = q
            else:
                clone = self._new_state(self._len[p] + 1, self._last_end[q], self._prev_end[q], self._occ[q])
                self._next[clone] = dict(self._next[q])
                self._link[clone] = self._link[q]
                while p != -1 and self._next[p].get(c) == q:
                    self._next[p][c] = clone
                    p = self._link[p]
                self._link[q] = clone
                self._link[cur] = clone
        self._tail = cur
        s, steps = cur, 0
        while s > 0 and steps < self.walk:
            if self._last_end[s] != i:
                self._prev_end[s] = self._last_end[s]
                self._last_end[s] = i
                self._occ[s] += 1
            s = self._link[s]
            steps += 1

    def _new_state(self, length: int, last_end: int, prev_end: int, occ: int) -> int:
        self._next.append({})
        self._link.append(-1)
        self._len.append(length)
        self._last_end.append(last_end)
        self._prev_end.append(prev_end)
        self._occ.append(occ)
        return len(self._len) - 1

    # -- matching ----------------------------------------------------------------------------

    def _longest_repeat(self) -> tuple[int, int]:
        """The longest suffix of the text (ending at the live tail) that also ends earlier."""
        s, steps = self._tail, 0
        while s > 0 and steps < self.walk:
            # A string that occurs twice holds no separator (each occurs once), so the match
            # lies inside the live stream and its length is the state's.
            if self._prev_end[s] >= 0:
                return s, self._len[s]
            s = self._link[s]
            steps += 1
        return 0, 0

    def _advance(self, s: int, length: int, c: int) -> tuple[int, int]:
        """Matching-statistics step for a token that is not indexed (past the bound)."""
        while s and c not in self._next[s]:
            s = self._link[s]
            length = self._len[s]
        if c in self._next[s]:
            return self._next[s][c], length + 1
        return 0, 0

    def propose(self, n: int) -> Proposal | None:
        """Up to n tokens continuing the live stream's suffix, or None when nothing repeats."""
        if n < 1 or self._match == 0:
            return None
        s = self._state
        end = self._prev_end[s] if not self._overflow else self._last_end[s]
        if end < 0:
            return None
        out: list[int] = []
        for t in self._text[end + 1:end + 1 + n]:
            if t < 0:
                break
            out.append(t)
        if not out:
            return None
        return Proposal(tuple(out), self._match, max(1, self._occ[s] - (0 if self._overflow else 1)),
                        from_live=end >= self._live_start)

    # -- accounting --------------------------------------------------------------------------

    @property
    def indexed_tokens(self) -> int:
        return len(self._text)

    @property
    def states(self) -> int:
        return len(self._len)

    def memory_estimate(self) -> int:
        """Bytes held by the automaton's lists and transition dicts (an estimate)."""
        lists = (self._text, self._link, self._len, self._last_end, self._prev_end, self._occ, self._next)
        return (sum(sys.getsizeof(x) for x in lists) + sum(sys.getsizeof(d) for d in self._next)
                + 28 * (len(self._text) + 5 * len(self._len)))


def _check_token(t: int) -> int:
    t = int(t)
    if t < 0:
        raise ValueError(f"token ids are >= 0, got {t}")
    return t
