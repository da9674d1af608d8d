"""Pre-drafting for the likeliest verdict other than the guess (`DrafterSession.draft_alternative`),
on the real ONNX runtime with the tiny random drafter, greedy.

With a round in flight and the next drafted ahead on the guess, the drafter prepares the round
after another verdict. Whichever verdict comes (the one prepared for, the guess, or another), the
session must go on exactly as a fresh session over the committed tokens would: the same next
drafts. The prepared round is handed out by `draft` without a pass."""

from __future__ import annotations

import pytest

from edge_node.drafter import DrafterModel, DrafterSession
from tandem_core.sampling import SamplingParams

GREEDY = SamplingParams()
PROMPT = [5 + (i * 13) % 200 for i in range(40)]
K = 4


@pytest.fixture(scope="module")
def drafter(tiny_models) -> DrafterModel:
    return DrafterModel(tiny_models.drafter_onnx)


def _fresh_drafts(drafter: DrafterModel, committed: list[int], k: int) -> tuple[int, ...]:
    return drafter.new_session(committed, GREEDY, 0, max_length=len(committed) + 40).draft(k).tokens


def _in_flight(drafter: DrafterModel) -> tuple[DrafterSession, tuple[int, ...], int, tuple[int, ...]]:
    """A session with a round sent, the next drafted ahead on the guess and an alternative prepared."""
    session = drafter.new_session(PROMPT, GREEDY, 0, max_length=len(PROMPT) + 80)
    sent = session.draft(K).tokens
    guess, ahead = session.draft_ahead(K)
    assert ahead.tokens and session.draft_alternative(K)
    return session, sent, guess, ahead.tokens


def test_the_verdict_prepared_for_hands_its_round_out_without_drafting(drafter: DrafterModel) -> None:
    session, sent, _, _ = _in_flight(drafter)
    assert session._alt is not None
    j, t, prepared = session._alt
    verdict = [*sent[:j], t]
    session.commit(j, verdict)
    assert session.alt_hits == 1 and session.pending == ()
    cached = session.cached
    out = session.draft(K)
    assert session.cached == cached  # no pass: it was drafted while the verdict was in flight
    assert out.tokens == prepared.tokens[:K]
    assert out.tokens == _fresh_drafts(drafter, [*PROMPT, *verdict], len(out.tokens))
    session.commit(len(out.tokens), [*out.tokens, 7])  # and the session goes on as usual
    committed = [*PROMPT, *verdict, *out.tokens, 7]
    assert session.draft(K).tokens == _fresh_drafts(drafter, committed, K)


def test_the_guessed_verdict_rebuilds_the_round_ahead(drafter: DrafterModel) -> None:
    session, sent, guess, ahead = _in_flight(drafter)
    verdict = [*sent, guess]
    session.commit(K, verdict)
    assert session.alt_hits == 0 and session.pending == ahead  # the round ahead is the next round
    guess2, after = session.draft_ahead(K)  # drafting on from it works on the rebuilt cache
    session.commit(len(ahead), [*ahead, guess2])
    committed = [*PROMPT, *verdict, *ahead, guess2]
    assert session.pending == after.tokens
    assert after.tokens == _fresh_drafts(drafter, committed, len(after.tokens))


@pytest.mark.parametrize("accepted", [0, 1, K - 1])
def test_any_other_verdict_rewinds_as_without_an_alternative(drafter: DrafterModel, accepted: int) -> None:
    session, sent, _, _ = _in_flight(drafter)
    assert session._alt is not None
    j, t, _ = session._alt
    # the target's token: not the draft there (it would have been accepted), not the alternative's
    other = next(x for x in (3, 4, 5) if x != sent[accepted] and not (accepted == j and x == t))
    verdict = [*sent[:accepted], other]
    session.commit(accepted, verdict)
    assert session.alt_hits == 0 and session.pending == ()
    assert session.draft(K).tokens == _fresh_drafts(drafter, [*PROMPT, *verdict], K)


def test_no_alternative_in_sampling_mode_or_without_a_round_ahead(drafter: DrafterModel) -> None:
    sampled = drafter.new_session(PROMPT, SamplingParams(temperature=0.8, seed=1), 1, max_length=len(PROMPT) + 40)
    sampled.draft(K)
    sampled.draft_ahead(K)
    assert not sampled.draft_alternative(K)  # a seeded answer must not depend on timing
    greedy = drafter.new_session(PROMPT, GREEDY, 0, max_length=len(PROMPT) + 40)
    greedy.draft(K)
    assert not greedy.draft_alternative(K)  # nothing ahead: nothing to prepare beside
    greedy.draft_ahead(K)
    assert not greedy.draft_alternative(K, stop=lambda: True)  # the verdict is in: too late


def test_rollback_drops_a_prepared_round(drafter: DrafterModel) -> None:
    session, sent, _, _ = _in_flight(drafter)
    j, t, _ = session._alt  # type: ignore[misc]
    session.commit(j, [*sent[:j], t])
    session.rollback()  # the link failed: the device goes on from the committed tokens
    eos: frozenset[int] = frozenset()
    local = list(session.generate(max_new_tokens=6, eos_ids=eos))
    fresh = drafter.new_session([*PROMPT, *sent[:j], t], GREEDY, 0, max_length=len(PROMPT) + 40)
    assert local == list(fresh.generate(max_new_tokens=6, eos_ids=eos))
