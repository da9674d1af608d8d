"""Unit tests for greedy verification and `finalize` (EOS and budget truncation)."""

from __future__ import annotations

import numpy as np
import pytest

from tandem_core.verify import Verdict, finalize, verify_greedy

V = 10
EOS = frozenset({9})


def logits_for(argmaxes: list[int]) -> np.ndarray:
    """(len, V) logits whose row i has its maximum at argmaxes[i]."""
    logits = np.random.default_rng(0).standard_normal((len(argmaxes), V)).astype(np.float32)
    logits[np.arange(len(argmaxes)), argmaxes] = 10.0
    return logits


def test_zero_accepted_gives_the_correction() -> None:
    verdict = verify_greedy([1, 2, 3], logits_for([4, 2, 3, 5]), eos_ids=EOS, remaining=100)
    assert verdict == Verdict(accepted=0, tokens=(4,), finished=False, finish_reason=None)


def test_partial_accept_then_correction() -> None:
    verdict = verify_greedy([1, 2, 3], logits_for([1, 2, 7, 5]), eos_ids=EOS, remaining=100)
    assert verdict == Verdict(accepted=2, tokens=(1, 2, 7), finished=False, finish_reason=None)


def test_all_accepted_appends_bonus() -> None:
    verdict = verify_greedy([1, 2, 3], logits_for([1, 2, 3, 5]), eos_ids=EOS, remaining=100)
    assert verdict == Verdict(accepted=3, tokens=(1, 2, 3, 5), finished=False, finish_reason=None)


def test_target_as_its_own_drafter_reproduces_greedy_decoding() -> None:
    logits = np.random.default_rng(1).standard_normal((6, V))
    drafts = np.argmax(logits[:5], axis=1).tolist()
    verdict = verify_greedy(drafts, logits, eos_ids=frozenset(), remaining=100)
    assert verdict.accepted == 5
    assert list(verdict.tokens) == np.argmax(logits, axis=1).tolist()


def test_eos_inside_accepted_drafts_truncates_after_it() -> None:
    verdict = verify_greedy([1, 9, 3], logits_for([1, 9, 3, 5]), eos_ids=EOS, remaining=100)
    assert verdict == Verdict(accepted=2, tokens=(1, 9), finished=True, finish_reason="stop")


def test_eos_as_correction_token() -> None:
    verdict = verify_greedy([1, 2], logits_for([1, 9, 4]), eos_ids=EOS, remaining=100)
    assert verdict == Verdict(accepted=1, tokens=(1, 9), finished=True, finish_reason="stop")


def test_budget_reached_mid_round() -> None:
    verdict = verify_greedy([1, 2, 3], logits_for([1, 2, 3, 5]), eos_ids=EOS, remaining=2)
    assert verdict == Verdict(accepted=2, tokens=(1, 2), finished=True, finish_reason="length")


def test_budget_used_exactly_without_eos_is_length() -> None:
    verdict = verify_greedy([1, 2], logits_for([1, 4, 5]), eos_ids=EOS, remaining=2)
    assert verdict == Verdict(accepted=1, tokens=(1, 4), finished=True, finish_reason="length")


def test_k_zero_is_one_target_token() -> None:
    assert verify_greedy([], logits_for([6]), eos_ids=EOS, remaining=5) == Verdict(0, (6,), False, None)
    assert verify_greedy([], logits_for([6]), eos_ids=EOS, remaining=1) == Verdict(0, (6,), True, "length")


def test_ties_go_to_lowest_id() -> None:
    logits = np.zeros((2, V))
    assert verify_greedy([0], logits, eos_ids=frozenset(), remaining=9).tokens == (0, 0)


@pytest.mark.parametrize(
    ("drafts", "shape", "match"),
    [
        ([1, 2], (2, V), "target_logits"),
        ([1], (2,), "target_logits"),
        ([1, V], (3, V), r"\[0, 10\)"),
        ([-1], (2, V), "draft"),
    ],
)
def test_validation(drafts: list[int], shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        verify_greedy(drafts, np.zeros(shape), eos_ids=EOS, remaining=5)


def test_nan_logits_raise() -> None:
    logits = logits_for([1, 2])
    logits[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        verify_greedy([1], logits, eos_ids=EOS, remaining=5)


def test_finalize_eos_wins_over_length_at_the_same_token() -> None:
    assert finalize(2, [1, 9, 3], EOS, remaining=2) == Verdict(2, (1, 9), True, "stop")


def test_finalize_eos_beyond_budget_is_length() -> None:
    assert finalize(2, [1, 2, 9], EOS, remaining=2) == Verdict(2, (1, 2), True, "length")


def test_finalize_reports_only_kept_drafts() -> None:
    assert finalize(3, [1, 2, 3, 4], frozenset(), remaining=1).accepted == 1
    assert finalize(3, [9, 2, 3, 4], EOS, remaining=8).accepted == 1


@pytest.mark.parametrize(
    ("accepted", "proposed", "remaining"), [(0, [1], 0), (2, [1], 3), (-1, [1], 3), (0, [], 3)]
)
def test_finalize_validation(accepted: int, proposed: list[int], remaining: int) -> None:
    with pytest.raises(ValueError):
        finalize(accepted, proposed, EOS, remaining)
