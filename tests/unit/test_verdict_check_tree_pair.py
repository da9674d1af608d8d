"""`tandem.pair`'s metered wrappers: they expose exactly the optional methods the wrapped drafter or
scorer has (the loop looks them up with getattr), meter them, and let a tree round through
`target_round` (`score_tree`, `commit_path`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from tandem.pair import Meter, _MeteredDraft, _MeteredScore
from tandem_core.loop import Draft, TargetVerifier
from tandem_core.sampling import SamplingParams

V = 16


class ChainScorer:
    """A `ScoreSession` whose greedy token after any context is (last + 1) % V."""

    def __init__(self) -> None:
        self.context, self.calls = [3], []

    def _row(self, last: int) -> np.ndarray:
        row = np.zeros(V)
        row[(last + 1) % V] = 1.0
        return row

    def score(self, draft_tokens: Sequence[int]) -> np.ndarray:
        self.calls.append("score")
        return np.array([self._row(t) for t in (self.context[-1], *draft_tokens)])

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        self.calls.append("commit")
        self.context.extend(tokens)


class TreeScorer(ChainScorer):
    def score_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> np.ndarray:
        self.calls.append("score_tree")
        return np.array([self._row(t) for t in (self.context[-1], *tokens)])

    def commit_path(self, path: Sequence[int], tokens: Sequence[int]) -> None:
        self.calls.append("commit_path")
        self.context.extend(tokens)


class PlainDrafter:
    def draft(self, k: int) -> Draft:
        return Draft((), None)

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        pass

    def rollback(self) -> None:
        pass


class FullDrafter(PlainDrafter):
    def draft_ahead(self, k: int, stop: object = None) -> tuple[int, Draft]:
        return 0, Draft((), None)

    def prefill(self, stop: object = None) -> bool:
        return True

    def draft_alternative(self, k: int, stop: object = None) -> bool:
        return False

    def adopt(self, tokens: Sequence[int]) -> tuple[int, ...]:
        return tuple(tokens)


OPTIONAL_DRAFT = ("draft_ahead", "prefill", "draft_alternative", "adopt")


def test_a_drafter_without_the_optional_methods_shows_none() -> None:
    wrapped = _MeteredDraft(PlainDrafter(), Meter())
    for name in OPTIONAL_DRAFT:
        assert getattr(wrapped, name, None) is None
    assert getattr(wrapped, "score_tree", None) is None and not hasattr(wrapped, "pending")


def test_a_drafter_with_them_shows_each_metered() -> None:
    meter = Meter()
    wrapped = _MeteredDraft(FullDrafter(), meter)
    assert wrapped.draft_ahead(2, None) == (0, Draft((), None))
    assert wrapped.prefill(None) is True and wrapped.draft_alternative(2, None) is False
    assert wrapped.adopt([4, 5]) == (4, 5)
    assert meter.wall_s > 0
    assert getattr(wrapped, "score_tree", None) is None  # a scorer's method never shows on a drafter


@pytest.mark.parametrize("scorer", [ChainScorer, TreeScorer])
def test_a_scorer_shows_the_tree_methods_only_when_it_has_them(scorer: type) -> None:
    wrapped = _MeteredScore(scorer(), Meter())
    assert callable(getattr(wrapped, "score_tree", None)) == (scorer is TreeScorer)
    assert callable(getattr(wrapped, "commit_path", None)) == (scorer is TreeScorer)
    assert getattr(wrapped, "draft_ahead", None) is None  # nor a drafter's on a scorer


def test_a_tree_round_goes_through_the_metered_scorer() -> None:
    inner, meter = TreeScorer(), Meter()
    verifier = TargetVerifier(_MeteredScore(inner, meter), SamplingParams(), seed=0, start=1, max_new_tokens=10,
                              eos_ids=frozenset())
    # root -> 9 (wrong), root -> 4 (right) -> 5 (right): the path goes down the sibling
    verdict = verifier.verify(Draft((9, 4, 5), None, parents=(-1, -1, 1)))
    assert (verdict.accepted, verdict.tokens) == (2, (4, 5, 6))
    assert inner.calls == ["score_tree", "commit_path"] and inner.context == [3, 4, 5, 6]
    assert meter.cpu_s > 0 or meter.wall_s > 0
