"""Which source drafts a round (`tandem_core.lookup`): pure logic, with a fake model drafter."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from tandem_core.lookup import MIN_MATCH, LookupDrafter, LookupPolicy, bucket_of, expected_accepted
from tandem_core.loop import Draft
from tandem_core.suffix_index import Proposal, SuffixIndex


@pytest.mark.parametrize(("a", "n", "want"), [(0.5, 1, 0.5), (0.5, 2, 0.75), (1.0, 7, 7.0), (0.0, 5, 0.0),
                                              (0.9, 0, 0.0)])
def test_expected_accepted(a: float, n: int, want: float) -> None:
    assert expected_accepted(a, n) == pytest.approx(want)


def test_buckets_are_monotone() -> None:
    assert [bucket_of(m) for m in (2, 3, 4, 5, 6, 9, 10, 16, 31, 32, 500)] == [0, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6]


def proposal(match: int, n: int = 16) -> Proposal:
    return Proposal(tuple(range(n)), match, 1, True)


@pytest.mark.parametrize(("prop", "draft_s", "source", "k"), [
    (None, 0.035, "model", 4),                       # nothing repeats: the model's usual round
    (proposal(MIN_MATCH - 1), 0.035, "model", 4),    # a one-token match is too common to trust
    (proposal(40), 10.0, "retrieval", 16),           # a slow drafter: send the copy as it is
    (proposal(2), 0.0, "model", 4),                  # a free drafter checks a weak copy itself
    (proposal(40), 0.0, "retrieval", 16),            # a long match beats the drafter's own acceptance
    (proposal(2, n=1), 10.0, "retrieval", 1),        # even one copied token beats a 10 s draft
])
def test_choices(prop: Proposal | None, draft_s: float, source: str, k: int) -> None:
    c = LookupPolicy(round_s=0.3, draft_s=draft_s).choose(prop, k_max=16, model_len=4)
    assert (c.source, c.k) == (source, k)


def test_the_copy_is_cut_to_what_the_verifier_takes() -> None:
    c = LookupPolicy(draft_s=10.0).choose(proposal(40), k_max=5, model_len=4)
    assert (c.source, c.k) == ("retrieval", 5)


def test_copies_that_keep_failing_lose_their_rounds() -> None:
    policy = LookupPolicy(round_s=0.3, draft_s=0.03)
    first = policy.choose(proposal(40), k_max=16, model_len=4)
    assert first.source == "retrieval"
    for _ in range(10):
        policy.learn(first, 40, 16, 0)  # rejected at the first draft, every time
    assert policy.choose(proposal(40), k_max=16, model_len=4).source == "model"
    assert policy.choose(proposal(10), k_max=16, model_len=4).source == "retrieval"  # another bucket


def test_the_same_measurements_give_the_same_choices() -> None:
    def run() -> list[tuple[str, int]]:
        policy, out = LookupPolicy(), []
        for i in range(40):
            c = policy.choose(proposal(2 + i % 20, 1 + i % 16), k_max=16, model_len=4)
            out.append((c.source, c.k))
            policy.learn(c, 2 + i % 20, c.k, i % (c.k + 1))
            policy.observe_round(0.05 + 0.01 * (i % 7))
            policy.observe_draft(0.02 + 0.001 * (i % 5))
        return out

    assert run() == run()


def test_timings_that_are_not_finite_are_ignored() -> None:
    policy = LookupPolicy()
    policy.observe_round(float("nan"))
    policy.observe_draft(float("inf"))
    policy.observe_round(-1.0)
    assert np.isfinite(policy.round_s) and np.isfinite(policy.draft_s)


class FakeModelSession:
    """A model drafter that always drafts 7s; records adopt/commit/rollback."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def draft(self, k: int, hint: Sequence[int] = (), min_len: int | None = None) -> Draft:
        self.calls.append(("draft", k, tuple(hint), min_len))
        n = k if min_len is None else min_len
        return Draft((7,) * n, None)

    def adopt(self, tokens: Sequence[int]) -> tuple[int, ...]:
        self.calls.append(("adopt", tuple(tokens)))
        return tuple(tokens)

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        self.calls.append(("commit", accepted, tuple(tokens)))

    def rollback(self) -> None:
        self.calls.append(("rollback",))


def test_with_a_fake_model_a_copied_round_is_adopted_one_hot_and_commits_feed_the_index() -> None:
    index = SuffixIndex()
    index.extend([1, 2, 3, 4, 1, 2])
    model = FakeModelSession()
    drafter = LookupDrafter(model, index, LookupPolicy(draft_s=10.0), model_len=4, vocab=6)
    d = drafter.draft(3)
    assert d.tokens == (3, 4, 1) and d.retrieved == 3 and model.calls[0] == ("adopt", (3, 4, 1))
    assert d.q is not None and d.q.shape == (3, 6) and (d.q.argmax(axis=1) == [3, 4, 1]).all() and d.q.sum() == 3
    drafter.commit(1, (3, 5))
    assert model.calls[-1] == ("commit", 1, (3, 5))
    p = index.propose(4)  # the index saw the commit: ...1 2 3 5 matches nothing long
    assert p is None or p.match_len < 3
    assert drafter.rounds_copied == 1


def test_with_a_fake_model_a_checked_round_passes_the_hint_and_counts_the_agreement() -> None:
    index = SuffixIndex()
    index.extend([1, 2, 7, 7, 8, 1, 2])
    model = FakeModelSession()
    drafter = LookupDrafter(model, index, LookupPolicy(draft_s=0.0), model_len=2, vocab=None)
    d = drafter.draft(16)
    assert model.calls[0] == ("draft", 16, (7, 7, 8, 1, 2), 2)
    assert d.tokens == (7, 7) and d.retrieved == 2 and d.q is None
    drafter.rollback()
    assert model.calls[-1] == ("rollback",)
    assert drafter.rounds_checked == 1 and drafter.rounds_copied == 0


def trained(accept_all: bool, *, rounds: int = 30, row_s: float = 0.01, draft_s: float = 0.03) -> LookupPolicy:
    """A policy after `rounds` model rounds of 8 drafts, all accepted or all rejected at once."""
    policy = LookupPolicy(round_s=0.3, draft_s=draft_s, row_s=row_s)
    for _ in range(rounds):
        c = policy.choose(None, k_max=16, model_len=8)
        policy.learn(c, 0, 8, 8 if accept_all else 0)
        policy.observe_round(0.3 + row_s * 8, 8)
    return policy


def test_adaptive_length_grows_with_acceptance_and_drops_to_zero_without_it() -> None:
    assert trained(True).adaptive_len(16)[0] >= 10
    low = trained(False)
    picks = [low.adaptive_len(16)[0] for _ in range(8)]
    assert picks == [0, 0, 0, 1, 0, 0, 0, 1]  # plain target decoding, probing every 4th round


def test_adaptive_length_shrinks_when_rows_cost_verification_time() -> None:
    cheap = trained(True, row_s=0.001).adaptive_len(16)[0]
    dear = trained(True, row_s=0.2).adaptive_len(16)[0]
    assert dear < cheap


def test_the_round_time_fit_learns_the_cost_of_a_row() -> None:
    policy = LookupPolicy(round_s=0.1, row_s=0.0)
    for k in (2, 4, 8, 12, 16) * 10:
        policy.observe_round(0.2 + 0.05 * k, k)
    assert policy.round_time(0) == pytest.approx(0.2, abs=0.02)
    assert policy.round_time(10) == pytest.approx(0.7, abs=0.03)


def test_a_pinned_length_is_kept_whatever_was_learnt() -> None:
    assert trained(False).choose(None, k_max=16, model_len=5).k == 5
    assert trained(True).choose(None, k_max=3, model_len=None).k == 3  # within the verifier's limit
