"""The suffix index behind retrieval drafts (`tandem_core.suffix_index`), against brute force."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem_core.suffix_index import SuffixIndex

streams = st.lists(st.integers(0, 3), min_size=0, max_size=40)


def brute(docs: list[list[int]], live: list[int], n: int) -> tuple[tuple[int, ...], int, int] | None:
    """(continuation, match length, earlier occurrences) by scanning every earlier end."""
    text: list[int] = []
    for i, d in enumerate(docs):
        text += [*d, -(i + 1)]
    text += live
    end = len(text) - 1
    best = 0
    for m in range(1, len(live) + 1):
        suffix = text[end - m + 1:]
        if any(text[j - m + 1:j + 1] == suffix for j in range(m - 1, end)):
            best = m
        else:
            break
    if best == 0:
        return None
    suffix = text[end - best + 1:]
    ends = [j for j in range(best - 1, end) if text[j - best + 1:j + 1] == suffix]
    out = []
    for t in text[ends[-1] + 1:ends[-1] + 1 + n]:
        if t < 0:
            break
        out.append(t)
    return (tuple(out), best, len(ends)) if out else None


@settings(max_examples=300, deadline=None)
@given(docs=st.lists(streams, max_size=3), live=streams.filter(bool), n=st.integers(1, 8))
def test_proposals_equal_brute_force(docs: list[list[int]], live: list[int], n: int) -> None:
    index = SuffixIndex(walk=10**6)  # an unbounded walk: counts and ends exact
    for d in docs:
        assert index.add_document(d)
    for t in live:  # one token at a time, as commits arrive
        index.extend([t])
    got = index.propose(n)
    want = brute(docs, live, n)
    if want is None:
        assert got is None
    else:
        assert got is not None
        assert (got.tokens, got.match_len, got.occurrences) == want


@settings(max_examples=200, deadline=None)
@given(docs=st.lists(streams, max_size=2), live=streams.filter(bool), n=st.integers(1, 8))
def test_a_bounded_walk_still_proposes_a_real_earlier_occurrence(docs: list[list[int]], live: list[int],
                                                                 n: int) -> None:
    index = SuffixIndex(walk=2)
    for d in docs:
        index.add_document(d)
    index.extend(live)
    got = index.propose(n)
    if got is None:
        return
    text: list[int] = []
    for i, d in enumerate(docs):
        text += [*d, -(i + 1)]
    text += live
    suffix = text[len(text) - got.match_len:]
    starts = [j for j in range(len(text) - got.match_len) if text[j:j + got.match_len] == suffix]
    assert any(tuple(text[j + got.match_len:j + got.match_len + len(got.tokens)]) == got.tokens for j in starts)


def test_a_copy_from_a_document_stops_at_its_end_and_never_runs_into_the_next() -> None:
    index = SuffixIndex()
    index.add_document([5, 6, 7])
    index.add_document([8, 9])
    index.extend([1, 5, 6])
    p = index.propose(10)
    assert p is not None and p.tokens == (7,) and not p.from_live and p.match_len == 2


def test_the_live_stream_proposes_from_its_own_earlier_text() -> None:
    index = SuffixIndex()
    index.extend([1, 2, 3, 4, 9, 1, 2])
    p = index.propose(3)
    assert p is not None and p.tokens == (3, 4, 9) and p.from_live and p.match_len == 2


def test_the_bound_refuses_documents_and_keeps_matching_past_it() -> None:
    index = SuffixIndex(max_tokens=12)
    assert index.add_document([1, 2, 3, 4, 5])
    assert not index.add_document(list(range(20)))  # would pass the bound: nothing indexed
    assert index.indexed_tokens == 6
    index.extend([7, 7, 7, 7, 7, 1, 2])  # the last tokens are past the bound: matched, not indexed
    assert index.indexed_tokens == 12
    p = index.propose(3)
    assert p is not None and p.tokens == (3, 4, 5)


def test_memory_stays_proportional_to_the_tokens_indexed() -> None:
    index = SuffixIndex(max_tokens=20_000)
    index.extend([(i * 7919) % 997 for i in range(30_000)])
    assert index.indexed_tokens == 20_000
    assert index.states <= 2 * 20_000
    assert index.memory_estimate() < 2_000 * 20_000  # well under 2 KB a token


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        SuffixIndex(max_tokens=0)
    index = SuffixIndex()
    with pytest.raises(ValueError):
        index.extend([-1])
    index.extend([1])
    with pytest.raises(RuntimeError):
        index.add_document([2])
    assert index.propose(0) is None
