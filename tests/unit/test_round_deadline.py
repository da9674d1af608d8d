"""tandem_core.deadline: the round deadline that follows the measured rounds.

Tables of samples -> deadline against the formula in the module docstring, the guarantees
(cold start, ceiling over floor, `missed`, the window, not adaptive), the links the issue names
replayed as seeded latency sequences (a jittery link and a contention spike must not misfire; a
black-holed link waits far less than the ceiling once learnt; a link that slowed down between
answers is not cut short after its stream's first round), properties over any samples
(hypothesis), and bad arguments. Latencies are plain floats (seconds): no clock.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tandem_core.deadline import FLOOR_MS, DeadlinePolicy, RoundDeadline
from tests.support.fuzz import fuzz

CEILING = 5.0


def _learnt(samples: list[tuple[int, float]], policy: DeadlinePolicy | None = None) -> RoundDeadline:
    d = RoundDeadline(policy)
    for rows, latency in samples:
        d.observe(rows, latency)
    return d


def _same(n: int, latency: float, rows: int = 5) -> list[tuple[int, float]]:
    return [(rows, latency)] * n


LOW_FLOOR = DeadlinePolicy(floor_s=0.001)  # to read the formula where the floor would hide it

# (name, policy, samples, rows, ceiling, fastest, expected seconds)
TABLE = [
    ("no sample: the ceiling", None, [], 5, CEILING, None, CEILING),
    ("7 of 8 samples: still the ceiling", None, _same(7, 0.01), 5, CEILING, None, CEILING),
    ("8 fast samples: the floor", None, _same(8, 0.01), 5, CEILING, None, FLOOR_MS / 1000),
    ("8 samples: Q_0.9 is their maximum", LOW_FLOOR, [(5, 0.1 * i) for i in range(1, 9)], 5, CEILING, None,
     2.5 * 0.8 + 0.1),
    ("10 samples: the 9th smallest", LOW_FLOOR, [(5, 0.01 * i) for i in range(10, 0, -1)], 5, CEILING, None,
     2.5 * 0.09 + 0.1),
    ("64 samples: the 58th smallest", LOW_FLOOR, [(5, 0.001 * i) for i in range(1, 65)], 5, CEILING, None,
     2.5 * 0.058 + 0.1),
    ("past the window: only the last 64 count", LOW_FLOOR, _same(64, 0.9) + _same(64, 0.02), 5, CEILING, None,
     2.5 * 0.02 + 0.1),
    ("capped by the ceiling", None, _same(8, 0.5), 5, 1.0, None, 1.0),
    ("the ceiling wins over the floor", None, _same(8, 0.01), 5, 0.2, None, 0.2),
    ("more rows: grows as (rows + 32) / (rows_i + 32)", LOW_FLOOR, _same(8, 0.2, rows=5), 17, CEILING, None,
     2.5 * 0.2 * 49 / 37 + 0.1),
    ("fewer rows: never faster than measured", LOW_FLOOR, _same(8, 0.2, rows=17), 1, CEILING, None,
     2.5 * 0.2 + 0.1),
    ("rows mixed: each sample scaled, then the quantile", LOW_FLOOR, _same(4, 0.2, rows=1) + _same(4, 0.1, rows=33),
     17, CEILING, None, 2.5 * 0.2 * 49 / 33 + 0.1),
    ("fastest on this stream raises it", None, _same(8, 0.01), 5, CEILING, 0.4, 2.5 * 0.4 + 0.1),
    ("fastest below the learnt value changes nothing", LOW_FLOOR, _same(8, 0.3), 5, CEILING, 0.05, 2.5 * 0.3 + 0.1),
    ("fastest counts only once learnt (cold: the ceiling)", None, [], 5, CEILING, 0.01, CEILING),
    ("not adaptive: the ceiling whatever the samples", DeadlinePolicy(adaptive=False), _same(64, 0.01), 5, 1.0,
     None, 1.0),
    ("another floor", DeadlinePolicy(floor_s=0.5), _same(8, 0.01), 5, CEILING, None, 0.5),
    ("another quantile and factor", DeadlinePolicy(floor_s=0.001, quantile=0.5, mult=2.0, margin_s=0.0),
     [(5, 0.01 * i) for i in range(1, 11)], 5, CEILING, None, 2.0 * 0.05),
]


@pytest.mark.parametrize(("policy", "samples", "rows", "ceiling", "fastest", "expected"),
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_the_deadline_follows_the_table(policy, samples, rows, ceiling, fastest, expected) -> None:
    assert _learnt(samples, policy).deadline_s(rows, ceiling, fastest) == pytest.approx(expected, rel=1e-12)


def test_a_missed_verdict_forgets_the_samples_until_enough_new_ones() -> None:
    d = _learnt(_same(64, 0.01))
    assert d.deadline_s(5, CEILING) == 0.3
    d.missed()
    assert d.samples == 0
    for _ in range(7):
        d.observe(5, 0.01)
        assert d.deadline_s(5, CEILING) == CEILING
    d.observe(5, 0.01)
    assert d.deadline_s(5, CEILING) == 0.3


def test_the_same_calls_give_the_same_deadlines() -> None:
    rng = random.Random(3)
    calls = [(rng.randint(1, 17), rng.uniform(0.0, 2.0)) for _ in range(200)]
    a, b = RoundDeadline(), RoundDeadline()
    for rows, latency in calls:
        a.observe(rows, latency)
        b.observe(rows, latency)
        assert a.deadline_s(rows, CEILING) == b.deadline_s(rows, CEILING)


# --- the links of the issue, replayed -----------------------------------------------------------


def _misfires(latencies: list[tuple[int, float]], ceiling: float, d: RoundDeadline | None = None) -> list[int]:
    """Replay rounds online: each waits the deadline learnt from the rounds before it; returns the
    rounds whose latency passed it (a misfire, which `missed` then reports)."""
    d = d if d is not None else RoundDeadline()
    late = []
    for i, (rows, latency) in enumerate(latencies):
        if latency > d.deadline_s(rows, ceiling):
            late.append(i)
            d.missed()
        else:
            d.observe(rows, latency)
    return late


def _jittery(rng: random.Random, n: int, rtt_s: float, jitter_s: float, verify_s: float) -> list[tuple[int, float]]:
    """netshape's model: each direction rtt/2 + U(-jitter, +jitter), draft lengths 1 to 16."""
    return [(rng.randint(2, 17), max(0.0, rtt_s / 2 + rng.uniform(-jitter_s, jitter_s))
             + max(0.0, rtt_s / 2 + rng.uniform(-jitter_s, jitter_s)) + verify_s * rng.uniform(1.0, 1.5))
            for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_a_jittery_link_never_misfires(seed: int) -> None:
    rounds = _jittery(random.Random(seed), 2000, rtt_s=0.2, jitter_s=0.05, verify_s=0.03)
    d = RoundDeadline()
    assert _misfires(rounds, 1.0, d) == []
    assert d.deadline_s(5, 1.0) < 1.0  # it did learn: below the ceiling, yet above every round


def test_a_contention_spike_of_three_times_the_median_does_not_misfire() -> None:
    """A loaded 2-core machine makes a verification 2 to 3 times slower, at once."""
    rng = random.Random(7)
    calm = [(5, rng.uniform(0.2, 0.3)) for _ in range(200)]
    spike = [(5, 3 * 0.25 * rng.uniform(0.95, 1.0)) for _ in range(50)]
    assert _misfires(calm + spike, 2.0) == []


def test_a_slower_spike_misfires_once_then_waits_the_ceiling() -> None:
    """The control: 4x the median does misfire, once; the rounds after wait the ceiling."""
    calm, spike = _same(200, 0.25), _same(50, 1.0)
    assert _misfires(calm + spike, 2.0) == [200]


def test_a_black_holed_link_is_given_up_long_before_the_ceiling_once_learnt() -> None:
    rng = random.Random(11)
    d = _learnt([(5, rng.uniform(0.002, 0.03)) for _ in range(64)])
    assert d.deadline_s(5, 1.0) == 0.3  # at RTT 0: the floor, not the configured 1 s
    d = _learnt(_jittery(rng, 64, rtt_s=0.2, jitter_s=0.05, verify_s=0.03))
    assert 0.3 < d.deadline_s(5, 1.0) < 0.95


def test_a_link_that_slowed_between_answers_is_not_cut_short_after_the_first_round() -> None:
    """Learnt at RTT 40 ms; the next answer's stream runs at RTT 300 ms. Its first round waited
    the ceiling (it is never learnt from); from then on `fastest` carries the new link."""
    d = _learnt(_same(64, 0.045))
    assert d.deadline_s(5, 1.0) == 0.3  # below a 300 ms round: without `fastest` it would misfire
    first_round = 0.31 + 0.2  # with part of the cloud's prefill
    fastest = first_round
    for latency in (0.31, 0.32, 0.30, 0.33, 0.31):
        assert latency < d.deadline_s(5, 1.0, fastest)
        fastest = min(fastest, latency)
        d.observe(5, latency)


# --- properties over any samples ------------------------------------------------------------------

_samples = st.lists(st.tuples(st.integers(1, 17), st.floats(0.0, 100.0)), max_size=80)
_rows = st.integers(1, 17)
_ceiling = st.floats(0.001, 100.0)
_fastest = st.none() | st.floats(0.0, 100.0)


@fuzz(200)
@given(_samples, _rows, _ceiling, _fastest)
def test_within_the_floor_and_the_ceiling(samples, rows, ceiling, fastest) -> None:
    d = _learnt(samples).deadline_s(rows, ceiling, fastest)
    assert min(FLOOR_MS / 1000, ceiling) <= d <= ceiling


@fuzz(200)
@given(_samples, _rows, _rows, _ceiling, _fastest, st.floats(0.0, 100.0))
def test_more_rows_a_slower_sample_or_a_slower_stream_never_shorten_it(samples, rows, more, ceiling, fastest,
                                                                       slower) -> None:
    d = _learnt(samples)
    base = d.deadline_s(rows, ceiling, fastest)
    assert d.deadline_s(max(rows, more), ceiling, fastest) >= base
    assert d.deadline_s(rows, ceiling, None if fastest is None else fastest + slower) >= base
    if samples:
        i = int(slower) % len(samples)
        bumped = [*samples[:i], (samples[i][0], samples[i][1] + slower), *samples[i + 1:]]
        assert _learnt(bumped).deadline_s(rows, ceiling, fastest) >= base


# --- bad arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "error", "name"), [
    (lambda d: d.observe(0, 0.1), ValueError, "rows"),
    (lambda d: d.observe(True, 0.1), TypeError, "rows"),
    (lambda d: d.observe(5.0, 0.1), TypeError, "rows"),
    (lambda d: d.observe(5, -0.1), ValueError, "latency_s"),
    (lambda d: d.observe(5, math.nan), ValueError, "latency_s"),
    (lambda d: d.observe(5, math.inf), ValueError, "latency_s"),
    (lambda d: d.observe(5, 10**400), ValueError, "latency_s"),
    (lambda d: d.observe(5, "0.1"), TypeError, "latency_s"),
    (lambda d: d.deadline_s(5, 0.0), ValueError, "ceiling_s"),
    (lambda d: d.deadline_s(5, math.nan), ValueError, "ceiling_s"),
    (lambda d: d.deadline_s(0, 1.0), ValueError, "rows"),
    (lambda d: d.deadline_s(5, 1.0, -1.0), ValueError, "fastest_s"),
    (lambda d: d.deadline_s(5, 1.0, math.inf), ValueError, "fastest_s"),
])
def test_bad_arguments_are_refused_by_name_and_change_nothing(call, error, name) -> None:
    d = _learnt(_same(8, 0.2))
    before = d.deadline_s(5, CEILING)
    with pytest.raises(error, match=name):
        call(d)
    assert d.samples == 8 and d.deadline_s(5, CEILING) == before


@pytest.mark.parametrize(("fields", "name"), [
    ({"floor_s": 0.0}, "floor_s"), ({"floor_s": math.inf}, "floor_s"), ({"quantile": 0.0}, "quantile"),
    ({"quantile": 1.5}, "quantile"), ({"mult": 0.9}, "mult"), ({"margin_s": -0.1}, "margin_s"),
    ({"min_samples": 0}, "min_samples"), ({"window": 4}, "window"), ({"row_base": -1}, "row_base"),
])
def test_a_bad_policy_is_refused_by_name(fields, name) -> None:
    with pytest.raises(ValueError, match=name):
        DeadlinePolicy(**fields)


# --- the edge's configuration ----------------------------------------------------------------------


def _edge_config(argv: list[str], environ: dict[str, str]):
    import argparse

    from edge_node.config import ENV_PREFIX, EdgeConfig
    from tandem.config import add_flags, load

    parser = argparse.ArgumentParser()
    add_flags(parser, EdgeConfig, env_prefix=ENV_PREFIX)
    return load(EdgeConfig, parser.parse_args(argv), environ, env_prefix=ENV_PREFIX)


def test_the_edge_learns_its_deadline_by_default_and_a_flag_or_variable_turns_it_off() -> None:
    default = _edge_config([], {})
    assert default.adaptive_deadline and default.round_deadline_floor_ms == FLOOR_MS
    assert default.round_deadline_ms == 1000  # the ceiling
    assert not _edge_config(["--no-adaptive-deadline"], {}).adaptive_deadline
    assert not _edge_config([], {"TANDEM_EDGE_ADAPTIVE_DEADLINE": "false"}).adaptive_deadline
    assert _edge_config(["--adaptive-deadline"], {"TANDEM_EDGE_ADAPTIVE_DEADLINE": "false"}).adaptive_deadline
    floor = _edge_config(["--round-deadline-floor-ms", "500"], {"TANDEM_EDGE_ROUND_DEADLINE_FLOOR_MS": "700"})
    assert floor.round_deadline_floor_ms == 500


@pytest.mark.parametrize(("argv", "environ", "name"), [
    (["--round-deadline-floor-ms", "0"], {}, "round_deadline_floor_ms"),
    (["--round-deadline-floor-ms", "3600001"], {}, "round_deadline_floor_ms"),
    ([], {"TANDEM_EDGE_ROUND_DEADLINE_FLOOR_MS": "-5"}, "round_deadline_floor_ms"),
    ([], {"TANDEM_EDGE_ROUND_DEADLINE_FLOOR_MS": "0.3s"}, "TANDEM_EDGE_ROUND_DEADLINE_FLOOR_MS"),
    ([], {"TANDEM_EDGE_ADAPTIVE_DEADLINE": "maybe"}, "TANDEM_EDGE_ADAPTIVE_DEADLINE"),
])
def test_a_bad_deadline_setting_is_refused_by_name(argv, environ, name) -> None:
    from tandem.config import ConfigError

    with pytest.raises(ConfigError, match=name):
        _edge_config(argv, environ)
