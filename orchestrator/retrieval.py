"""Retrieval over the personal store: chunking, hybrid search and prompt injection.

Guarantees:
- `chunk_text` returns non-empty chunks of at most `max_chars` characters, each a contiguous
  slice of the input with surrounding whitespace trimmed; together they cover every
  non-whitespace character. Cuts fall on a paragraph break, else a line break, else a sentence
  end, else a space, and only when none exists in the window inside a word. Consecutive chunks
  share about `overlap` characters (started at a word boundary when one is there).
- `search` ranks chunks by cosine similarity to the query (unit vectors, so a dot product) and,
  when `hybrid`, fuses that ranking with FTS5 bm25 keyword matches by reciprocal rank fusion
  (Cormack et al. 2009, k=60). A chunk is returned only when its cosine reaches `min_score`,
  or, when `hybrid`, when it contains every term of the query (stopwords aside) and its cosine
  is not negative: names and identifiers ("Dr. Alvarez") embed poorly, but overlap on a few
  common words never pulls an unrelated (possibly private) chunk into a prompt. `Hit.score`
  is the cosine. Every hit carries its document's current privacy label.
- `fts_query` turns any user text into a safe FTS5 expression (each word a quoted string,
  joined by OR or AND), so quotes, operators or column filters in the text never raise.
- `inject_context` never mutates its input; it returns plain role/content dicts (the chat
  template is applied later by the edge node).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.store import PersonalStore

DEFAULT_MIN_SCORE = 0.25  # MiniLM cosine: unrelated text scores about -0.15..0.2 (measured)
KEYWORD_MIN_SCORE = 0.0  # the floor for a chunk that contains every term of the query
RRF_K = 60
CANDIDATES = 50  # per ranking, before fusion
MAX_QUERY_TERMS = 32

CONTEXT_INSTRUCTION = (
    "The user's own documents may help with this request. Excerpts, numbered:")
CONTEXT_FOOTER = (
    "Use these excerpts when they are relevant and cite them by number, e.g. [1]; "
    "ignore them when they are not relevant.")


@dataclass(frozen=True)
class Hit:
    doc_id: str
    title: str
    chunk_index: int
    text: str
    score: float  # cosine similarity of the chunk and the query, in [-1, 1]
    privacy: str  # "private" or "shareable"


# --- chunking -----------------------------------------------------------------------------

_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_LINE = re.compile(r"\n")
_SENTENCE = re.compile(r"[.!?][\"')\]]*(?=\s)")
_SPACE = re.compile(r"\s")


def chunk_text(text: str, max_chars: int = 800, overlap: int = 100) -> list[str]:
    """Split `text` into overlapping chunks (see the module docstring); ValueError if blank."""
    return [text[s:e] for s, e in chunk_spans(text, max_chars, overlap)]


def chunk_spans(text: str, max_chars: int = 800, overlap: int = 100) -> list[tuple[int, int]]:
    """The (start, end) slices `chunk_text` returns, in order."""
    if max_chars < 2:
        raise ValueError(f"max_chars: must be >= 2, got {max_chars}")
    if not 0 <= overlap < max_chars // 2:
        raise ValueError(f"overlap: must be in [0, max_chars/2), got {overlap}")
    if not text.strip():
        raise ValueError("text: must not be empty or whitespace")
    end = _trim_end(text, len(text))
    pos = _skip_space(text, 0)
    spans: list[tuple[int, int]] = []
    while True:
        if end - pos <= max_chars:
            spans.append((pos, end))
            return spans
        cut, next_pos = _find_cut(text, pos, max_chars, overlap)
        if not spans or cut > spans[-1][1]:  # else it lies inside the previous chunk
            spans.append((pos, cut))
        pos = next_pos


def _find_cut(text: str, pos: int, max_chars: int, overlap: int) -> tuple[int, int]:
    """(end of the chunk starting at `pos`, start of the next chunk)."""
    lo = pos + max(max_chars // 2, overlap + 1)  # keeps chunks big and guarantees progress
    hi = pos + max_chars
    for pattern, after in ((_PARAGRAPH, False), (_LINE, False), (_SENTENCE, True),
                           (_SPACE, False)):
        last = None
        for last in pattern.finditer(text, lo, hi + 1):  # noqa: B007 - keeps the last match
            pass
        if last is not None:  # the latest boundary gives the longest trimmed chunk
            cut = _trim_end(text, last.end() if after else last.start())
            if cut > lo:
                return cut, _overlap_start(text, cut, overlap, cut)
    cut = _trim_end(text, hi)
    if cut <= lo:  # a long run of whitespace: nothing in it to repeat
        return cut, _skip_space(text, hi)
    # No boundary in the window: the cut splits a word, and so may the overlap.
    return cut, _overlap_start(text, cut, overlap, cut - overlap)


def _overlap_start(text: str, cut: int, overlap: int, fallback: int) -> int:
    """The next chunk's start: the first word start in the last `overlap` characters."""
    if overlap == 0:
        return _skip_space(text, cut)
    m = _SPACE.search(text, cut - overlap, cut)
    if m is not None:
        return _skip_space(text, m.start())
    return _skip_space(text, fallback)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _trim_end(text: str, i: int) -> int:
    while i > 0 and text[i - 1].isspace():
        i -= 1
    return i


# --- search -------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")
_STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "by", "can", "could", "did", "do", "does", "for",
    "from", "had", "has", "have", "how", "i", "if", "in", "into", "is", "it", "its", "me", "my",
    "of", "on", "or", "our", "should", "so", "than", "that", "the", "their", "them", "then",
    "there", "these", "they", "this", "to", "was", "we", "were", "what", "when", "where", "which",
    "who", "whom", "why", "will", "with", "would", "you", "your", "s", "t", "d", "ll", "m",
    "re", "ve",
))


def query_terms(text: str) -> list[str]:
    """The distinct lower-case words of `text`, stopwords left out, at most MAX_QUERY_TERMS."""
    terms: list[str] = []
    for word in _WORD.findall(text.lower()):
        if word not in _STOPWORDS and word not in terms:
            terms.append(word)
    return terms[:MAX_QUERY_TERMS]


def fts_query(text: str, *, match_all: bool = False) -> str | None:
    """An FTS5 MATCH expression for `text`: its quoted terms joined by OR (AND when
    `match_all`), or None when it has no terms."""
    terms = query_terms(text)
    if not terms:
        return None
    joiner = " AND " if match_all else " OR "
    return joiner.join('"' + t.replace('"', '""') + '"' for t in terms)


def search(store: PersonalStore, query: str, k: int = 4, *, hybrid: bool = True,
           min_score: float = DEFAULT_MIN_SCORE) -> list[Hit]:
    """The `k` best chunks for `query` (see the module docstring); [] for a blank query."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if not query.strip():
        return []
    qvec = store.embedder.embed([query])[0]
    vector_ranked = store.nearest(qvec, CANDIDATES)
    cosine = dict(vector_ranked)
    fused = {cid: 1.0 / (RRF_K + rank) for rank, (cid, _) in enumerate(vector_ranked, 1)}
    all_terms: set[int] = set()
    any_match = fts_query(query) if hybrid else None
    if any_match is not None:
        keyword_ranked = store.keyword_search(any_match, CANDIDATES)
        all_terms = set(store.keyword_search(fts_query(query, match_all=True) or any_match,
                                             CANDIDATES))
        cosine.update(store.similarity(qvec, [c for c in keyword_ranked if c not in cosine]))
        for rank, cid in enumerate(keyword_ranked, 1):
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank)

    def admitted(c: int) -> bool:
        floor = min(min_score, KEYWORD_MIN_SCORE) if c in all_terms else min_score
        return cosine.get(c, -1.0) >= floor

    top = sorted(filter(admitted, fused), key=lambda c: (-fused[c], -cosine[c], c))[:k]
    records = store.chunks(top)
    return [Hit(doc_id=r.doc_id, title=r.title, chunk_index=r.chunk_index, text=r.text,
                score=cosine[c], privacy=r.privacy)
            for c in top if (r := records.get(c)) is not None]


# --- prompts ------------------------------------------------------------------------------


def prompt_to_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def query_from_messages(messages: Sequence[dict[str, str]]) -> str:
    """The text to retrieve with: the last user message's content ("" when there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


def context_block(hits: Sequence[Hit]) -> str:
    parts = [CONTEXT_INSTRUCTION]
    for n, hit in enumerate(hits, 1):
        parts.append(f"[{n}] {hit.title} (part {hit.chunk_index + 1})\n{hit.text.strip()}")
    parts.append(CONTEXT_FOOTER)
    return "\n\n".join(parts)


def inject_context(messages: Sequence[dict[str, str]], hits: Sequence[Hit]
                   ) -> list[dict[str, str]]:
    """`messages` with the hits in the system message (merged into a leading one, or new)."""
    out = [dict(m) for m in messages]
    for i, m in enumerate(out):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TypeError(f"messages[{i}]: needs string 'role' and 'content'")
    if not hits:
        return out
    block = context_block(hits)
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content'].rstrip()}\n\n{block}"
    else:
        out.insert(0, {"role": "system", "content": block})
    return out
