"""Pure retrieval logic: chunking, FTS5 query escaping and context injection (no models).

A chunking loop that stops making progress fails in seconds instead of waiting for the suite's
900 s timeout: every test here has a 5 s timeout (pytest-timeout), and the property test, which
pytest-timeout cannot stop (tests/support/fuzz.py says why), gives each example 2 s of CPU time.
"""

from __future__ import annotations

import random
import sqlite3
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.retrieval import (
    Hit,
    chunk_spans,
    chunk_text,
    fts_query,
    inject_context,
    prompt_to_messages,
    query_from_messages,
)
from tests.support.fuzz import cpu_limit, fuzz, timeout_s

pytestmark = pytest.mark.timeout(5)
FUZZ_QUICK = 300


def _assert_covers(text: str, max_chars: int, overlap: int) -> list[tuple[int, int]]:
    spans = chunk_spans(text, max_chars, overlap)
    covered = bytearray(len(text))
    for s, e in spans:
        assert 0 < e - s <= max_chars
        assert not text[s].isspace() and not text[e - 1].isspace()
        covered[s:e] = b"\x01" * (e - s)
    lost = [i for i, ch in enumerate(text) if not covered[i] and not ch.isspace()]
    assert lost == [], f"characters at {lost[:10]} are in no chunk"
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in pairwise(spans))
    assert chunk_text(text, max_chars, overlap) == [text[s:e] for s, e in spans]
    return spans


def _random_text(rng: random.Random) -> str:
    pieces = ["word", "sentence.", "Question?", "end!\n", "para\n\n", '"quoted."', "x" * 300,
              "  ", "\t", "naïve", "日本語の文。"]
    return "".join(rng.choice(pieces) + rng.choice([" ", "", "\n"])
                   for _ in range(rng.randint(1, 300)))


@pytest.mark.parametrize(("max_chars", "overlap"), [(800, 100), (120, 30), (50, 0), (40, 19)])
def test_chunking_never_loses_text_and_respects_max_size(max_chars: int, overlap: int) -> None:
    rng = random.Random(1234 + max_chars)
    for _ in range(120):
        text = _random_text(rng)
        if text.strip():
            _assert_covers(text, max_chars, overlap)


# Words, every kind of boundary the chunker looks for, runs of whitespace, and wide characters.
_PIECES = st.sampled_from(["a", "word", "x" * 90, ".", "?!", '."', ")", " ", "  ", "\t", "\n", "\n\n", "\n \n",
                           "\r\n", "\u00a0", "\u3000", "日本語。", "naïve"])


@st.composite
def _sizes(draw: st.DrawFn) -> tuple[int, int]:
    max_chars = draw(st.one_of(st.integers(2, 12), st.integers(2, 400), st.sampled_from([2, 3, 800])))
    return max_chars, draw(st.integers(0, max_chars // 2 - 1))


@pytest.mark.timeout(timeout_s(5, FUZZ_QUICK))
@fuzz(FUZZ_QUICK)
@given(pieces=st.lists(st.one_of(_PIECES, st.text(max_size=20)), min_size=1, max_size=200), sizes=_sizes())
def test_fuzz_chunking_ends_and_covers_the_text_in_order(pieces: list[str], sizes: tuple[int, int]) -> None:
    text = "".join(pieces)
    max_chars, overlap = sizes
    with cpu_limit(2.0, f"chunk_spans(<{len(text)} characters>, max_chars={max_chars}, overlap={overlap})"):
        if not text.strip():
            with pytest.raises(ValueError, match="text"):
                chunk_spans(text, max_chars, overlap)
            return
        spans = _assert_covers(text, max_chars, overlap)  # every non-space character, in order
    assert len(spans) <= len(text)


def test_one_giant_word_is_cut_into_overlapping_pieces() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(5000))
    spans = _assert_covers(text, 800, 100)
    assert len(spans) == 7  # 0..800, 700..1500, ..., 4200..5000
    assert all(b[0] == a[1] - 100 for a, b in pairwise(spans))


def test_cuts_prefer_paragraphs_then_sentences() -> None:
    paragraphs = [" ".join(f"Paragraph {p} sentence {s} says something." for s in range(8))
                  for p in range(6)]
    text = "\n\n".join(paragraphs)  # each paragraph ~300 chars: a window holds two of them
    chunks = chunk_text(text, 800, 100)
    assert len(chunks) > 1
    for chunk in chunks[:-1]:
        assert text[text.index(chunk) + len(chunk):].startswith("\n\n")
    sentences = " ".join(f"Sentence number {i} is here." for i in range(200))
    for chunk in chunk_text(sentences, 300, 50)[:-1]:
        assert chunk.endswith("."), chunk
        assert chunk.startswith("Sentence") or chunk[0].isalnum()


def test_consecutive_chunks_overlap() -> None:
    text = " ".join(f"w{i}" for i in range(2000))
    chunks = chunk_text(text, 200, 60)
    for a, b in pairwise(chunks):
        first_word = b.split()[0]
        assert first_word in a.split(), "the next chunk should start inside the previous one"


def test_short_text_is_one_trimmed_chunk() -> None:
    assert chunk_text("  hello world \n") == ["hello world"]


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_blank_text_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="text"):
        chunk_text(text)


@pytest.mark.parametrize(("max_chars", "overlap", "field"),
                         [(1, 0, "max_chars"), (100, 50, "overlap"), (100, -1, "overlap")])
def test_bad_chunk_sizes_name_the_argument(max_chars: int, overlap: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        chunk_text("some text", max_chars, overlap)


HOSTILE_QUERIES = ['say "hello', 'AND OR NOT', "NEAR(a b, 3)", "text: foo", "col:bar*", "^start",
                   "(unbalanced", "a - b + c", "'single' \"double\"", "*", "a OR", '""""',
                   "日本語", "émigré's café", "x" * 5000, "1 2 3 4 " * 50]


def test_fts_query_escapes_any_user_text() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE t USING fts5(text, tokenize = 'porter unicode61')")
    db.execute("INSERT INTO t (text) VALUES ('hello start foo bar near col 日本語 café')")
    for raw in HOSTILE_QUERIES:
        match = fts_query(raw)
        if match is not None:
            db.execute("SELECT rowid FROM t WHERE t MATCH ?", (match,)).fetchall()
    assert db.execute("SELECT count(*) FROM t WHERE t MATCH ?",
                      (fts_query('say "hello'),)).fetchone()[0] == 1


def test_fts_query_drops_stopwords_and_empty_input() -> None:
    assert fts_query("what is the") is None
    assert fts_query("  ?! ") is None
    assert fts_query("What is my cat's vet called?") == '"cat" OR "vet" OR "called"'
    assert fts_query("Dr. Alvarez", match_all=True) == '"dr" AND "alvarez"'


def _hit(n: int, privacy: str = "private") -> Hit:
    return Hit(doc_id=f"d{n}", title=f"Title {n}", chunk_index=n, text=f"chunk text {n}",
               score=0.5, privacy=privacy)


def test_inject_context_prepends_a_numbered_system_message() -> None:
    messages = prompt_to_messages("Who is my vet?")
    out = inject_context(messages, [_hit(0), _hit(1, "shareable")])
    assert messages == [{"role": "user", "content": "Who is my vet?"}]  # input untouched
    assert [m["role"] for m in out] == ["system", "user"]
    system = out[0]["content"]
    assert "[1] Title 0" in system and "chunk text 0" in system
    assert "[2] Title 1" in system and "chunk text 1" in system
    assert system.index("[1]") < system.index("[2]")
    assert "relevant" in system
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in out)


def test_inject_context_merges_into_an_existing_system_message() -> None:
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "hi"}]
    out = inject_context(messages, [_hit(3)])
    assert len(out) == 2 and out[0]["role"] == "system"
    assert out[0]["content"].startswith("You are terse.") and "[1] Title 3" in out[0]["content"]
    assert messages[0]["content"] == "You are terse."


def test_inject_context_without_hits_changes_nothing() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert inject_context(messages, []) == messages


def test_inject_context_rejects_malformed_messages() -> None:
    with pytest.raises(TypeError, match=r"messages\[1\]"):
        inject_context([{"role": "user", "content": "a"}, {"role": "user"}], [_hit(0)])


def test_query_from_messages_takes_the_last_user_turn() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "second"}]
    assert query_from_messages(messages) == "second"
    assert query_from_messages([{"role": "system", "content": "s"}]) == ""
