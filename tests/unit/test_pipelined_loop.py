"""Pipelined rounds through the real loop, with the fake models of `tests.support.sampling_models`.

Issue 15, item 1: while a round's verdict is in flight, the drafter drafts the next round on the
guess that every draft is accepted and the target's token is its own choice (`draft_ahead`), and
the round goes out tagged with that assumption. These tests hold the pipelined loop to the
sequential one: the same tokens for greedy and for seeded sampling (the fake drafter's choices
depend only on the committed tokens and per-position keys, as `edge_node.drafter`'s do, so the
two must agree exactly, not only in distribution), a round whose guess failed never commits a
token, and the pipeline statistics count what happened. The verifier is the real
`TargetVerifier` (its `submit`/`collect` drop a round whose assumption fails), over the fake target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import pytest

from tandem_core.loop import Assume, Draft, TargetVerifier, speculative_generate
from tandem_core.sampling import DRAFTER_STREAM, SamplingParams, round_rng, sample
from tandem_core.stats import RequestStats
from tandem_core.verify import Verdict
from tests.support.sampling_models import drafter_logits
from tests.unit.test_sampling_rows_and_keys import (
    CASES,
    PROMPT,
    Case,
    FakeDraftSession,
    FakeScoreSession,
    alternating,
)

GREEDY = SamplingParams()


class FakeAheadDrafter(FakeDraftSession):
    """The fake drafter with `draft_ahead`, keeping the unsettled draft as `edge_node.drafter` does."""

    def __init__(self, *args: object, wrong_guess: bool = False) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.pending: tuple[int, ...] = ()
        self.ahead: tuple[int, Draft] | None = None
        self.wrong_guess = wrong_guess  # guess a token the target never gives (every round ahead fails)

    def choose(self, context: Sequence[int]) -> tuple[int, np.ndarray | None]:
        if self.params.greedy:
            return int(np.argmax(self.logits(context))), None
        q = self.q(context)
        return sample(q, round_rng(self.seed, DRAFTER_STREAM, len(context))), q

    def draft(self, k: int) -> Draft:
        assert not self.pending and self.ahead is None
        d = self._draft_after(self.context, k)
        self.pending = d.tokens
        return d

    def _draft_after(self, context: Sequence[int], k: int) -> Draft:
        tokens: list[int] = []
        qs: list[np.ndarray] = []
        for _ in range(k):
            token, q = self.choose([*context, *tokens])
            tokens.append(token)
            if q is not None:
                qs.append(q)
        return Draft(tuple(tokens), np.stack(qs) if qs else None)

    def draft_ahead(self, k: int, stop: Callable[[], bool] | None = None) -> tuple[int, Draft]:
        assert self.ahead is None
        if stop is not None and stop():
            return -1, Draft((), None)
        context = [*self.context, *self.pending]
        guess = -5 if self.wrong_guess else int(np.argmax(self.logits(context)))  # as the real drafter guesses
        ahead = self._draft_after([*context, guess], k)
        while stop is not None and len(ahead.tokens) > 1 and stop():  # cut short, as the real drafter may be
            ahead = Draft(ahead.tokens[:-1], None if ahead.q is None else ahead.q[:-1])
        self.ahead = (guess, ahead)
        return guess, ahead

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        assert 0 <= accepted <= len(self.pending)
        ahead, self.ahead = self.ahead, None
        hit = ahead is not None and tuple(tokens) == (*self.pending, ahead[0])
        self.context.extend(tokens)
        self.pending = ahead[1].tokens if hit and ahead is not None else ()

    def rollback(self) -> None:
        self.pending, self.ahead = (), None


class CommitSpy(TargetVerifier):
    """The real verifier, recording every verdict it commits (it counts the rounds it drops)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.committed: list[int] = []

    def verify(self, draft: Draft) -> Verdict:
        verdict = super().verify(draft)
        self.committed.extend(verdict.tokens)
        return verdict


class SometimesReady(CommitSpy):
    """The real verifier, whose `ready` says yes at random: verdicts that come early, or late."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.rng = np.random.default_rng(7)

    def ready(self) -> bool:
        return bool(self.rng.random() < 0.4)


def run(case: Case, seed: int, *, pipeline: bool, first_sent: bool = False, wrong_guess: bool = False,
        early: bool = False) -> tuple[tuple[int, ...], RequestStats, CommitSpy]:
    drafter = FakeAheadDrafter(drafter_logits(case.drafter), list(PROMPT), case.params, seed, case.q_support,
                               wrong_guess=wrong_guess)
    verifier = (SometimesReady if early else CommitSpy)(FakeScoreSession(PROMPT), case.params, seed=seed,
                                                         start=len(PROMPT), max_new_tokens=case.n,
                                                         eos_ids=case.eos_ids)
    if first_sent:
        verifier.submit(Draft((), None))
    stats = RequestStats()
    out = [t for v in speculative_generate(drafter, verifier, draft_len=case.draft_len, max_new_tokens=case.n,
                                           stats=stats, pipeline=pipeline, first_sent=first_sent,
                                           early_verdicts=early)
           for t in v.tokens]
    return tuple(out), stats, verifier


LONG = {name: replace(case, n=12) for name, case in CASES.items()}
LONG["close-greedy-k3"] = Case("close", GREEDY, 3, 12, 0, 0)
LONG["shifted-greedy-alternating"] = Case("shifted", GREEDY, alternating, 12, 0, 0)


@pytest.mark.parametrize("name", list(LONG))
@pytest.mark.parametrize("first_sent", [False, True], ids=["plain-start", "first-round-sent"])
def test_pipelined_rounds_give_the_sequential_tokens_with_fake_models(name: str, first_sent: bool) -> None:
    case = LONG[name]
    tries = hits = 0
    for seed in range(40):
        # The same round 1 either way (sent with no drafts, or drafted): it decides the random keys used.
        sequential, _, _ = run(case, seed, pipeline=False, first_sent=first_sent)
        pipelined, stats, spy = run(case, seed, pipeline=True, first_sent=first_sent)
        assert pipelined == sequential, f"seed {seed}"
        assert tuple(spy.committed) == pipelined  # nothing committed beyond the answer
        assert stats.generated_tokens == len(pipelined)
        assert stats.pipeline_hits <= stats.pipeline_tries
        assert spy.dropped == stats.pipeline_tries - stats.pipeline_hits  # every failed guess was dropped
        tries, hits = tries + stats.pipeline_tries, hits + stats.pipeline_hits
    assert tries > 0
    if case.drafter == "close":
        assert hits > 0  # the close drafter's guesses hold often enough to be used


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0)], ids=["greedy", "sampled"])
def test_a_failed_guess_never_commits_a_token_with_fake_models(params: SamplingParams) -> None:
    case = Case("close", params, 3, 12, 0, 0)
    for seed in range(20):
        sequential, _, _ = run(case, seed, pipeline=False)
        pipelined, stats, spy = run(case, seed, pipeline=True, wrong_guess=True)
        assert pipelined == sequential and tuple(spy.committed) == pipelined
        assert stats.pipeline_tries > 0 and stats.pipeline_hits == 0
        assert spy.dropped == stats.pipeline_tries


def test_rounds_ahead_stay_within_the_budget_with_fake_models() -> None:
    """The round ahead drafts only what a round after a full verdict could still commit."""
    case = Case("close", GREEDY, 4, 7, 0, 0)
    drafter = FakeAheadDrafter(drafter_logits("close"), list(PROMPT), GREEDY, 0, 0)
    asked: list[int] = []
    original = drafter.draft_ahead

    def spy(k: int, stop: Callable[[], bool] | None = None) -> tuple[int, Draft]:
        asked.append(k)
        return original(k, stop)

    drafter.draft_ahead = spy  # type: ignore[method-assign]
    verifier = TargetVerifier(FakeScoreSession(PROMPT), GREEDY, seed=0, start=len(PROMPT), max_new_tokens=case.n,
                              eos_ids=frozenset())
    out = [t for v in speculative_generate(drafter, verifier, draft_len=4, max_new_tokens=case.n, pipeline=True)
           for t in v.tokens]
    assert len(out) == case.n
    assert asked and asked[0] == case.n - 4 - 2  # 7 tokens: round 1 commits at most 5, round 2 then drafts 1


def test_the_target_verifier_drops_a_round_whose_assumption_fails_with_fake_models() -> None:
    verifier = TargetVerifier(FakeScoreSession(PROMPT), GREEDY, seed=0, start=len(PROMPT), max_new_tokens=10,
                              eos_ids=frozenset())
    first = verifier.verify(Draft((), None))
    verifier.submit(Draft((1,), None), Assume(verifier.position, first.tokens[-1] + 1))
    assert verifier.collect() is None and verifier.position == len(PROMPT) + 1 and verifier.dropped == 1
    # Marked as expected to fail, a dropped round's reply is read past, with the next verdict.
    verifier.submit(Draft((1,), None), Assume(verifier.position, first.tokens[-1] + 1))
    verifier.expect_dropped()
    verifier.submit(Draft((), None))
    after = verifier.collect()
    assert after is not None and verifier.dropped == 2 and verifier.position == len(PROMPT) + 2
    assert verifier.last == after.tokens[-1]
    verifier.submit(Draft((1,), None), Assume(verifier.position, after.tokens[-1]))
    verdict = verifier.collect()
    assert verdict is not None and verifier.position == len(PROMPT) + 2 + len(verdict.tokens)


@pytest.mark.parametrize("drafter_kind", ["close", "shifted"])
def test_greedy_answers_hold_when_verdicts_cut_the_drafting_ahead_short_with_fake_models(drafter_kind: str) -> None:
    """A verdict in early stops the drafting ahead (fewer drafts, or no round ahead): round
    lengths then follow timing, and a greedy answer is still the target's, token for token."""
    case = Case(drafter_kind, GREEDY, 4, 16, 0, 0)
    cut = 0
    for seed in range(20):
        sequential, _, _ = run(case, seed, pipeline=False)
        pipelined, stats, spy = run(case, seed, pipeline=True, first_sent=True, early=True)
        assert pipelined == sequential and tuple(spy.committed) == pipelined
        cut += sum(n for k, n in enumerate(stats.rounds_by_drafted) if 0 < k < 4)
    assert cut > 0  # some rounds went out shorter than asked


class LazyAheadDrafter(FakeAheadDrafter):
    """The fake drafter building its cache in `steps` passes when asked, as a lazy
    `edge_node.drafter` session does; every other call finishes it first."""

    def __init__(self, *args: object, steps: int = 3, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.todo = steps

    def prefill(self, stop: Callable[[], bool] | None = None) -> bool:
        while self.todo:
            if stop is not None and stop():
                return False
            self.todo -= 1
        return True

    def draft(self, k: int) -> Draft:
        self.prefill()
        return super().draft(k)

    def draft_ahead(self, k: int, stop: Callable[[], bool] | None = None) -> tuple[int, Draft]:
        self.prefill()
        return super().draft_ahead(k, stop)

    def commit(self, accepted: int, tokens: Sequence[int]) -> None:
        self.prefill()
        super().commit(accepted, tokens)


class FixedReady(CommitSpy):
    """The real verifier whose `ready` always gives one answer: the verdict is in at once, or never early."""

    answer = False

    def ready(self) -> bool:
        return self.answer


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0)], ids=["greedy", "sampled"])
def test_the_first_token_does_not_wait_for_a_lazy_drafters_prefill_with_fake_models(params: SamplingParams) -> None:
    """Round 1 sent with the open: when its verdict is in before the drafter's cache is built, it
    is yielded at once (the drafter still has passes to run), and the answer is the same either
    way, seeded sampling included."""
    case = Case("close", params, 3, 12, 0, 0)
    for seed in range(20):
        sequential, _, _ = run(case, seed, pipeline=False, first_sent=True)
        for verdict_first in (True, False):
            drafter = LazyAheadDrafter(drafter_logits(case.drafter), list(PROMPT), case.params, seed,
                                       case.q_support)
            verifier = type("Ready", (FixedReady,), {"answer": verdict_first})(
                FakeScoreSession(PROMPT), case.params, seed=seed, start=len(PROMPT), max_new_tokens=case.n,
                eos_ids=case.eos_ids)
            verifier.submit(Draft((), None))
            out: list[int] = []
            for i, verdict in enumerate(speculative_generate(drafter, verifier, draft_len=case.draft_len,
                                                             max_new_tokens=case.n, pipeline=True,
                                                             first_sent=True)):
                if i == 0:
                    assert (drafter.todo > 0) == verdict_first, f"seed {seed}"
                out.extend(verdict.tokens)
            assert tuple(out) == sequential and tuple(verifier.committed) == sequential, f"seed {seed}"


def test_a_round_ahead_of_a_verdict_down_a_side_branch_is_dropped_with_a_fake_scorer() -> None:
    """The tree's chain is [1, 2] and 3 is 2's sibling; the target takes 1, 3, then 7. A round
    sent ahead on the chain [1, 2] then 7 assumes the same position and last token, reached by
    another path: `TargetVerifier` drops it, and an untagged round is verified."""
    from tandem_core.loop import Assume, Draft, TargetVerifier
    from tandem_core.sampling import SamplingParams

    class FakeTreeScorer:
        def score_tree(self, tokens, parents):  # type: ignore[no-untyped-def]
            rows = np.zeros((len(tokens) + 1, 10))
            rows[0, 1] = rows[1, 3] = rows[3, 7] = 1.0  # after the root: 1; after 1: 3; after 3: 7
            return rows

        def score(self, draft_tokens):  # type: ignore[no-untyped-def]
            rows = np.zeros((len(draft_tokens) + 1, 10))
            rows[:, 5] = 1.0
            return rows

        def commit_path(self, path, tokens):  # type: ignore[no-untyped-def]
            pass

        def commit(self, accepted, tokens):  # type: ignore[no-untyped-def]
            pass

    v = TargetVerifier(FakeTreeScorer(), SamplingParams(), seed=0, start=4, max_new_tokens=20, eos_ids=frozenset())
    tree = Draft((1, 2, 3), None, parents=(-1, 0, 0))
    v.submit(tree)
    v.submit(Draft((5,), None), Assume(4 + 3, 7))
    v.submit(Draft((5,), None))
    verdict = v.collect()
    assert verdict is not None and verdict.tokens == (1, 3, 7) and tree.kept(verdict) == 1
    assert v.collect() is None  # dropped: the chain [1, 2] was not what was accepted
    assert v.collect() is not None
