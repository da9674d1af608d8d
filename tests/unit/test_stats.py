"""Unit tests for tandem_core.stats."""

from __future__ import annotations

import json

import pytest

from tandem_core.stats import RequestStats, RoundStats
from tandem_core.verify import Verdict


def test_empty_stats_have_none_ratios() -> None:
    stats = RequestStats()
    assert stats.acceptance_rate is None
    assert stats.mean_accepted_len is None
    assert stats.target_forwards_per_token is None
    assert json.loads(json.dumps(stats.to_dict()))["acceptance_rate"] is None


def test_aggregates() -> None:
    stats = RequestStats()
    stats.add_target_forwards(1)  # prefill
    stats.add_round(RoundStats(drafted=4, accepted=4, emitted=5))  # all accepted + bonus
    stats.add_round(RoundStats(drafted=4, accepted=1, emitted=2))  # one accepted + correction
    stats.add_round(RoundStats(drafted=4, accepted=2, emitted=2))  # budget cut the correction
    assert (stats.rounds, stats.drafted, stats.accepted) == (3, 12, 7)
    assert (stats.generated_tokens, stats.target_forwards) == (9, 4)
    assert stats.acceptance_rate == pytest.approx(7 / 12)
    assert stats.mean_accepted_len == pytest.approx(9 / 3)
    assert stats.target_forwards_per_token == pytest.approx(4 / 9)


def test_plain_decoding_tokens_do_not_count_towards_tau() -> None:
    stats = RequestStats()
    stats.add_round(RoundStats(drafted=2, accepted=2, emitted=3))
    stats.add_target_forwards(2)
    stats.add_tokens(2)
    assert stats.generated_tokens == 5
    assert stats.mean_accepted_len == pytest.approx(3.0)
    assert stats.target_forwards_per_token == pytest.approx(3 / 5)


def test_zero_draft_rounds_leave_acceptance_undefined() -> None:
    stats = RequestStats()
    stats.add_round(RoundStats(drafted=0, accepted=0, emitted=1))
    assert stats.acceptance_rate is None
    assert stats.mean_accepted_len == 1.0


def test_to_dict_is_plain_json() -> None:
    stats = RequestStats()
    stats.add_round(
        RoundStats.from_verdict(3, Verdict(accepted=1, tokens=(5, 6), finished=False, finish_reason=None))
    )
    d = stats.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) >= {
        "rounds",
        "drafted",
        "accepted",
        "generated_tokens",
        "target_forwards",
        "acceptance_rate",
        "mean_accepted_len",
        "target_forwards_per_token",
    }
    assert d["acceptance_rate"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"drafted": -1, "accepted": 0, "emitted": 1}, "drafted"),
        ({"drafted": 2, "accepted": 3, "emitted": 4}, "exceed"),
        ({"drafted": 2, "accepted": 1, "emitted": 3}, "emitted"),
        ({"drafted": 2, "accepted": 2, "emitted": 1}, "emitted"),
        ({"drafted": 2, "accepted": 1.0, "emitted": 2}, "accepted"),
    ],
)
def test_round_stats_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RoundStats(**kwargs)  # type: ignore[arg-type]


def test_negative_increments_raise() -> None:
    with pytest.raises(ValueError):
        RequestStats().add_tokens(-1)
    with pytest.raises(ValueError):
        RequestStats().add_target_forwards(-1)
