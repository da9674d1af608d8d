"""tandem_core.deadline: the round deadline that follows the measured rounds (the link and the
cloud's verification learnt apart), and the link checks.

Tables of samples -> deadline, and -> check time and timeout, against the formulas in the module
docstring; the guarantees (cold start, ceiling over floor, `missed`, the window, not adaptive);
the links the issue names replayed as seeded latency sequences (a jittery link with rounds sent
ahead, and a cloud that is slower now and then, must not misfire; the real pair's rounds at
RTT 0, measured, neither; a black-holed link is given up far before the ceiling once learnt; a
link that slowed down between answers is not cut short after its stream's first round);
properties over any samples (hypothesis); and bad arguments. Latencies are plain floats
(seconds): no clock.
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
M_S, M_N, MARGIN = 2.0, 2.0, 0.05  # the defaults (see test_the_defaults_are_the_documented_ones)
Sample = tuple[int, float, float]  # rows, latency, server part


def _learnt(samples: list[Sample], policy: DeadlinePolicy | None = None, checks: list[float] = ()) -> RoundDeadline:
    d = RoundDeadline(policy)
    for rows, latency, server in samples:
        d.observe(rows, latency, server)
    for latency in checks:
        d.observe_check(latency)
    return d


def _same(n: int, latency: float, server: float = 0.0, rows: int = 5) -> list[Sample]:
    return [(rows, latency, server)] * n


LOW_FLOOR = DeadlinePolicy(floor_s=0.001)  # to read the formula where the floor would hide it

# (name, policy, samples, rows, ceiling, fastest, expected seconds)
TABLE = [
    ("no sample: the ceiling", None, [], 5, CEILING, None, CEILING),
    ("7 of 8 samples: still the ceiling", None, _same(7, 0.01), 5, CEILING, None, CEILING),
    ("8 fast samples: the floor", None, _same(8, 0.01), 5, CEILING, None, FLOOR_MS / 1000),
    ("no server timing: all of it is link", LOW_FLOOR, [(5, 0.1 * i, 0.0) for i in range(1, 9)], 5, CEILING, None,
     M_N * 0.8 + MARGIN),
    ("the slowest pass and the slowest link part", LOW_FLOOR, [(5, 0.22 + 0.01 * i, 0.2 + 0.01 * i) for i in range(8)],
     5, CEILING, None, M_S * 0.27 + M_N * 0.02 + MARGIN),
    ("the two need not come from the same round", LOW_FLOOR,
     [(5, 0.3, 0.29), (5, 0.3, 0.1), *_same(6, 0.2, 0.19)], 5, CEILING, None, M_S * 0.29 + M_N * 0.2 + MARGIN),
    ("21 rounds: the slowest pass, the slowest link part", None,
     [(5, 0.33 + 0.0025 * i, 0.3 + 0.0025 * i) for i in range(21)], 5, 1.0, None, M_S * 0.35 + M_N * 0.03 + MARGIN),
    ("64 samples, q = 0.98: the 63rd smallest of each part", DeadlinePolicy(floor_s=0.001, quantile=0.98),
     [(5, 0.002 * i, 0.001 * i) for i in range(1, 65)], 5, CEILING, None, M_S * 0.063 + M_N * 0.063 + MARGIN),
    ("past the window: only the last 64 count", LOW_FLOOR, _same(64, 0.9, 0.8) + _same(64, 0.03, 0.02), 5,
     CEILING, None, M_S * 0.02 + M_N * 0.01 + MARGIN),
    ("capped by the ceiling", None, _same(8, 0.9, 0.6), 5, 1.0, None, 1.0),
    ("the ceiling wins over the floor", None, _same(8, 0.01), 5, 0.2, None, 0.2),
    ("more rows: the pass grows as (rows + 32) / (rows_i + 32), the link does not", LOW_FLOOR,
     _same(8, 0.25, 0.2), 17, CEILING, None, M_S * 0.2 * 49 / 37 + M_N * 0.05 + MARGIN),
    ("fewer rows: never faster than measured", LOW_FLOOR, _same(8, 0.25, 0.2, rows=17), 1, CEILING, None,
     M_S * 0.2 + M_N * 0.05 + MARGIN),
    ("rows mixed: each pass scaled, then the quantile", LOW_FLOOR,
     _same(4, 0.2, 0.2, rows=1) + _same(4, 0.1, 0.1, rows=33), 17, CEILING, None, M_S * 0.2 * 49 / 33 + MARGIN),
    ("a server part above the latency counts as the latency", LOW_FLOOR, _same(8, 0.2, 0.5), 5, CEILING, None,
     M_S * 0.2 + MARGIN),
    ("fastest on this stream raises the link part", None, _same(8, 0.01), 5, CEILING, 0.4, M_N * 0.4 + MARGIN),
    ("fastest below the learnt link part changes nothing", LOW_FLOOR, _same(8, 0.3, 0.1), 5, CEILING, 0.05,
     M_S * 0.1 + M_N * 0.2 + MARGIN),
    ("fastest counts only once learnt (cold: the ceiling)", None, [], 5, CEILING, 0.01, CEILING),
    ("not adaptive: the ceiling whatever the samples", DeadlinePolicy(adaptive=False), _same(64, 0.01), 5, 1.0,
     None, 1.0),
    ("another floor", DeadlinePolicy(floor_s=0.5), _same(8, 0.01), 5, CEILING, None, 0.5),
    ("other factors and quantile", DeadlinePolicy(floor_s=0.001, quantile=0.5, server_mult=1.0, link_mult=1.0,
                                                   margin_s=0.0),
     [(5, 0.03 * i, 0.02 * i) for i in range(1, 11)], 5, CEILING, None, 0.02 * 5 + 0.01 * 5),
]


@pytest.mark.parametrize(("policy", "samples", "rows", "ceiling", "fastest", "expected"),
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_the_deadline_follows_the_table(policy, samples, rows, ceiling, fastest, expected) -> None:
    assert _learnt(samples, policy).deadline_s(rows, ceiling, fastest) == pytest.approx(expected, rel=1e-12)


# (name, samples with `ahead`, answered checks, expected seconds)
TRIPS = [
    ("8 rounds all sent ahead: the ceiling (no round trip measured)", [(5, 0.25, 0.2, True)] * 8, [], CEILING),
    ("and 2 not: still the ceiling", [(5, 0.25, 0.2, True)] * 8 + [(5, 0.3, 0.2, False)] * 2, [], CEILING),
    ("and 3 not: learnt", [(5, 0.25, 0.2, True)] * 8 + [(5, 0.3, 0.2, False)] * 3, [],
     M_S * 0.2 + M_N * 0.1 + MARGIN),
    ("2 not and a check: learnt, the check a link part", [(5, 0.25, 0.2, True)] * 8 + [(5, 0.3, 0.2, False)] * 2,
     [0.15], M_S * 0.2 + M_N * 0.15 + MARGIN),
]


@pytest.mark.parametrize(("samples", "checks", "expected"), [row[1:] for row in TRIPS], ids=[row[0] for row in TRIPS])
def test_the_link_part_needs_whole_round_trips(samples, checks, expected) -> None:
    d = RoundDeadline(LOW_FLOOR)
    for rows, latency, server, ahead in samples:
        d.observe(rows, latency, server, ahead=ahead)
    for latency in checks:
        d.observe_check(latency)
    assert d.deadline_s(5, CEILING) == pytest.approx(expected, rel=1e-12)


def test_the_defaults_are_the_documented_ones() -> None:
    p = DeadlinePolicy()
    assert (p.quantile, p.server_mult, p.link_mult, p.margin_s, p.window, p.min_samples, p.row_base) == (
        0.99, M_S, M_N, MARGIN, 64, 8, 32)
    assert (p.check_every_s, p.check_floor_s, p.min_checks, p.min_trips) == (0.1, 0.1, 2, 3)
    assert p.floor_s == FLOOR_MS / 1000 == 0.3


# (name, samples, policy, deadline, expected check_after seconds)
CHECK_AFTER = [
    ("not learnt: no check (the deadline)", _same(7, 0.3, 0.25), None, 1.0, 1.0),
    ("learnt: every 100 ms, however slow the rounds", _same(8, 0.9, 0.85), None, 1.0, 0.1),
    ("learnt on quick rounds: every 100 ms too", _same(8, 0.01, 0.005), None, 0.3, 0.1),
    ("never above the deadline", _same(8, 0.5, 0.45), DeadlinePolicy(check_every_s=0.5), 0.4, 0.4),
    ("a longer spacing when the policy says so", _same(8, 0.3, 0.25), DeadlinePolicy(check_every_s=0.25), 1.0, 0.25),
    ("never below the check floor", _same(8, 0.3, 0.25), DeadlinePolicy(check_every_s=0.02), 1.0, 0.1),
]


@pytest.mark.parametrize(("samples", "policy", "deadline", "expected"), [row[1:] for row in CHECK_AFTER],
                         ids=[row[0] for row in CHECK_AFTER])
def test_a_waiting_round_is_checked_every_check_every(samples, policy, deadline, expected) -> None:
    assert _learnt(samples, policy).check_after_s(deadline) == pytest.approx(expected, rel=1e-12)


# (name, policy, answered checks, fastest, expected timeout or None)
CHECK_TIMEOUT = [
    ("no check answered: none", None, [], None, None),
    ("1 of 2: still none", None, [0.01], None, None),
    ("2 fast checks: the check floor", None, [0.01] * 2, None, 0.1),
    ("m_n x the slowest + margin", None, [0.02, 0.2, 0.05, 0.01], None, M_N * 0.2 + MARGIN),
    ("past the window: only the last 64", None, [0.5] * 10 + [0.04] * 64, None, M_N * 0.04 + MARGIN),
    ("a link that slowed: fastest on this stream", None, [0.01] * 8, 0.3, M_N * 0.3 + MARGIN),
    ("fastest below the slowest check changes nothing", None, [0.2] * 8, 0.05, M_N * 0.2 + MARGIN),
    ("not adaptive: none", DeadlinePolicy(adaptive=False), [0.2] * 8, None, None),
]


@pytest.mark.parametrize(("policy", "checks", "fastest", "expected"), [row[1:] for row in CHECK_TIMEOUT],
                         ids=[row[0] for row in CHECK_TIMEOUT])
def test_a_check_times_out_after_the_slowest_answered_one_with_margin(policy, checks, fastest, expected) -> None:
    d = _learnt(_same(8, 0.3, 0.25), policy, checks)
    assert d.checks == min(len(checks), 64) and d.check_timeout_s(fastest) == (
        None if expected is None else pytest.approx(expected, rel=1e-12))


def test_the_first_check_comes_at_the_check_floor_once_learnt() -> None:
    assert _learnt(_same(7, 0.3, 0.25)).first_check_s(1.0) == 1.0  # not learnt: no check
    d = _learnt(_same(8, 0.3, 0.25))
    assert d.first_check_s(1.0) == 0.1 and d.first_check_s(0.05) == 0.05
    assert _learnt(_same(8, 0.3, 0.25), DeadlinePolicy(check_floor_s=0.2)).first_check_s(1.0) == 0.2


def test_not_adaptive_never_checks() -> None:
    d = _learnt(_same(64, 0.3, 0.25), DeadlinePolicy(adaptive=False), [0.01] * 8)
    assert d.deadline_s(5, 1.0) == d.first_check_s(1.0) == d.check_after_s(1.0) == 1.0


def test_a_missed_verdict_forgets_the_rounds_until_enough_new_ones_and_keeps_the_checks() -> None:
    d = _learnt(_same(64, 0.01, 0.005), checks=[0.01] * 8)
    assert d.deadline_s(5, CEILING) == 0.3 and d.check_timeout_s() == 0.1
    d.missed()
    assert d.samples == 0 and d.checks == 8 and d.check_timeout_s() == 0.1
    assert d.check_after_s(d.deadline_s(5, CEILING)) == CEILING  # no check until learnt again
    for _ in range(7):
        d.observe(5, 0.01, 0.005)
        assert d.deadline_s(5, CEILING) == CEILING
    d.observe(5, 0.01, 0.005)
    assert d.deadline_s(5, CEILING) == 0.3


def test_the_same_calls_give_the_same_deadlines() -> None:
    rng = random.Random(3)
    calls = [(rng.randint(1, 17), rng.uniform(0.0, 2.0), rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.1))
             for _ in range(200)]
    a, b = RoundDeadline(), RoundDeadline()
    for rows, latency, server, check in calls:
        for d in (a, b):
            d.observe(rows, latency, server)
            d.observe_check(check)
        assert a.deadline_s(rows, CEILING) == b.deadline_s(rows, CEILING)
        assert a.check_after_s(CEILING) == b.check_after_s(CEILING)
        assert a.check_timeout_s() == b.check_timeout_s()


# --- the links of the issue, replayed -----------------------------------------------------------


Round = tuple[int, float, float, bool, bool]  # rows, latency, server part, opening, sent ahead


def _misfires(rounds: list[Round], ceiling: float, d: RoundDeadline | None = None) -> list[int]:
    """Replay rounds online: each waits the deadline learnt from the rounds before it (an opening
    round the ceiling, and it is not learnt from, as on the edge); returns the rounds whose latency
    passed it (a misfire, which `missed` then reports)."""
    d = d if d is not None else RoundDeadline()
    late = []
    for i, (rows, latency, server, opening, ahead) in enumerate(rounds):
        if latency > (ceiling if opening else d.deadline_s(rows, ceiling)):
            late.append(i)
            d.missed()
        elif not opening:
            d.observe(rows, latency, server, ahead=ahead)
    return late


def _link(rng: random.Random, rtt_s: float, jitter_s: float) -> tuple[float, float]:
    """netshape's model: each direction rtt/2 + U(-jitter, +jitter)."""
    return tuple(max(0.0, rtt_s / 2 + rng.uniform(-jitter_s, jitter_s)) for _ in range(2))  # type: ignore[return-value]


def _answers(rng: random.Random, n: int, rtt_s: float, jitter_s: float, verify_s: float, *, ahead: float = 0.0,
             report: bool = True) -> list[Round]:
    """`n` answers of 10 rounds each: an opening round (with a prefill of one pass), then rounds of
    2 to 17 rows, a share `ahead` of them sent ahead. A round sent ahead waits from the previous
    verdict: the server starts it once the previous one is done (it was sent long before), so its
    latency is its pass plus the difference of two downlink delays, and at least its pass. With
    `report` false the cloud reports no timing (server part 0)."""
    rounds = []
    for _ in range(n):
        up, down = _link(rng, rtt_s, jitter_s)
        rounds.append((1, up + 2 * verify_s + down, 2 * verify_s if report else 0.0, True, False))
        for _ in range(9):
            rows, s, sent_ahead = rng.randint(2, 17), verify_s * rng.uniform(1.0, 1.5), rng.random() < ahead
            up, new_down = _link(rng, rtt_s, jitter_s)
            latency = s + max(0.0, new_down - down) if sent_ahead else up + s + new_down
            rounds.append((rows, latency, s if report else 0.0, False, sent_ahead))
            down = new_down
    return rounds


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("verify_s", "ahead", "report"), [(0.03, 0.0, True), (0.03, 0.9, True), (0.3, 0.9, True),
                                                           (0.03, 0.9, False), (0.3, 0.0, False)])
def test_a_jittery_link_never_misfires(seed: int, verify_s: float, ahead: float, report: bool) -> None:
    rounds = _answers(random.Random(seed), 200, rtt_s=0.2, jitter_s=0.05, verify_s=verify_s, ahead=ahead,
                      report=report)
    d = RoundDeadline()
    assert _misfires(rounds, 2.0, d) == []
    assert d.deadline_s(5, 2.0) < 2.0  # it did learn: below the ceiling, yet above every round


def _measured_at_rtt_0(rng: random.Random, n: int) -> list[Round]:
    """`n` answers of the real pair at RTT 0 as measured on the 2-core machine (BENCHMARKS.md,
    fallback): passes of 220 to 480 ms; a link part of 5 to 60 ms for a round sent after the
    verdict before it; a round sent ahead (70%) waits from that verdict, which the edge may read
    up to 200 ms after the cloud began the next pass (it was drafting), so its latency is its pass
    minus up to 200 ms, or plus up to 12 ms."""
    rounds = []
    for _ in range(n):
        rounds.append((1, 0.9, 0.8, True, False))
        for _ in range(9):
            s, ahead = rng.uniform(0.22, 0.48), rng.random() < 0.7
            link = rng.uniform(-0.2, 0.012) if ahead else rng.uniform(0.005, 0.06)
            rounds.append((5, max(0.0, s + link), s, False, ahead))
    return rounds


@pytest.mark.parametrize("seed", range(5))
def test_the_real_pair_at_rtt_0_never_misfires_and_a_dead_link_is_checked_early(seed: int) -> None:
    """The deadline lets every measured round through; a black hole is given up by the check
    (after the median round, then the check's timeout) well within the fallback benchmark's goal
    (a stall <= 600 ms at RTT 0, the first local token included), the deadline alone would not."""
    d = RoundDeadline()
    assert _misfires(_measured_at_rtt_0(random.Random(seed), 200), 1.0, d) == []
    deadline = d.deadline_s(5, 1.0)
    assert deadline == 1.0  # 2 x the slowest pass: the ceiling
    for check in (0.01, 0.03, 0.02, 0.015):  # health checks at RTT 0
        d.observe_check(check)
    assert d.check_after_s(deadline) + d.check_timeout_s() < 0.25  # a link dying mid-round
    assert d.first_check_s(deadline) + d.check_timeout_s() < 0.25  # one dying between rounds


def test_a_pass_twice_the_slowest_at_once_does_not_misfire() -> None:
    """A loaded 2-core machine makes a verification pass twice as slow, at once: within m_s."""
    rng = random.Random(7)
    calm = [(5, 0.3 * rng.uniform(0.8, 1.0) + 0.01, 0.3 * rng.uniform(0.8, 1.0), False, False) for _ in range(200)]
    spike = [(5, 2 * 0.3 * rng.uniform(0.95, 1.0) + 0.01, 2 * 0.3, False, False) for _ in range(50)]
    assert _misfires(calm + spike, 2.0) == []


def test_a_pass_three_times_as_slow_at_once_misfires_once_then_waits_the_ceiling() -> None:
    """The control: a sudden load that makes every pass three times the slowest misfires once;
    the rounds after wait the ceiling, then learn it."""
    calm, spike = _same(200, 0.31, 0.3), _same(50, 0.91, 0.9)
    d = RoundDeadline()
    assert _misfires([(*s, False, False) for s in calm + spike], 3.0, d) == [200]
    assert d.deadline_s(5, 3.0) == pytest.approx(M_S * 0.9 + M_N * 0.01 + MARGIN)


def test_a_black_holed_link_is_given_up_long_before_the_ceiling_once_learnt() -> None:
    rng = random.Random(11)
    d = _learnt([(5, s + rng.uniform(0.001, 0.005), s) for s in (rng.uniform(0.002, 0.02) for _ in range(64))])
    assert d.deadline_s(5, 1.0) == 0.3  # at RTT 0 with a tiny model: the floor, not the configured 1 s
    d = RoundDeadline()
    for rows, latency, server, opening, ahead in _answers(rng, 7, rtt_s=0.2, jitter_s=0.05, verify_s=0.03):
        if not opening:
            d.observe(rows, latency, server, ahead=ahead)
    assert 0.3 < d.deadline_s(5, 1.0) < 0.95


def test_a_link_that_slowed_between_answers_is_not_cut_short_after_the_first_round() -> None:
    """Learnt at RTT 40 ms; the next answer's stream runs at RTT 300 ms. Its first round waited
    the ceiling and is not learnt from; from then on `fastest` (the smallest link part of a round
    not sent ahead on this stream, the first included) carries the new link."""
    d = _learnt(_same(64, 0.045, 0.005))
    assert d.deadline_s(5, 1.0) == 0.3  # below a 300 ms round: without `fastest` it would misfire
    first_round = (0.31 + 0.2, 0.2 + 0.005)  # with the cloud's prefill, which it reports
    fastest = first_round[0] - first_round[1]
    for latency in (0.31, 0.32, 0.30, 0.33, 0.31):
        assert latency < d.deadline_s(5, 1.0, fastest)
        fastest = min(fastest, latency - 0.005)
        d.observe(5, latency, 0.005)


# --- properties over any samples ------------------------------------------------------------------

_samples = st.lists(st.tuples(st.integers(1, 17), st.floats(0.0, 100.0), st.floats(0.0, 100.0)), max_size=80)
_checks = st.lists(st.floats(0.0, 100.0), max_size=80)
_rows = st.integers(1, 17)
_ceiling = st.floats(0.001, 100.0)
_fastest = st.none() | st.floats(0.0, 100.0)


@fuzz(200)
@given(_samples, _checks, _rows, _ceiling, _fastest)
def test_within_the_floor_and_the_ceiling_and_checked_before_the_deadline(samples, checks, rows, ceiling,
                                                                            fastest) -> None:
    d = _learnt(samples, checks=checks)
    deadline = d.deadline_s(rows, ceiling, fastest)
    assert min(FLOOR_MS / 1000, ceiling) <= deadline <= ceiling
    assert min(0.1, deadline) <= d.first_check_s(deadline) <= d.check_after_s(deadline) <= deadline
    timeout = d.check_timeout_s(fastest)
    assert (timeout is None) == (len(checks) < 2) and (timeout is None or timeout >= 0.1)


@fuzz(200)
@given(_samples, _checks, _rows, _rows, _ceiling, _fastest, st.floats(0.0, 100.0))
def test_more_rows_a_slower_sample_check_or_stream_never_shorten_it(samples, checks, rows, more, ceiling, fastest,
                                                                    slower) -> None:
    d = _learnt(samples, checks=checks)
    base = d.deadline_s(rows, ceiling, fastest)
    assert d.deadline_s(max(rows, more), ceiling, fastest) >= base
    assert d.deadline_s(rows, ceiling, None if fastest is None else fastest + slower) >= base
    if samples:
        i = int(slower) % len(samples)
        rows_i, latency, server = samples[i]
        server = min(server, latency)  # as observed
        for bumped in ((rows_i, latency + slower, server),  # a longer link part
                       (rows_i, latency + slower, server + slower)):  # a longer pass
            assert _learnt([*samples[:i], bumped, *samples[i + 1:]]).deadline_s(rows, ceiling, fastest) >= base
    if len(checks) >= 2:
        i = int(slower) % len(checks)
        bumped_checks = [*checks[:i], checks[i] + slower, *checks[i + 1:]]
        assert _learnt(samples, checks=bumped_checks).check_timeout_s(fastest) >= d.check_timeout_s(fastest)
        assert d.check_timeout_s(None if fastest is None else fastest + slower) >= d.check_timeout_s(fastest)


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
    (lambda d: d.observe(5, 0.1, -0.1), ValueError, "server_s"),
    (lambda d: d.observe(5, 0.1, math.nan), ValueError, "server_s"),
    (lambda d: d.observe(5, 0.1, None), TypeError, "server_s"),
    (lambda d: d.observe(5, 0.1, 0.05, ahead=1), TypeError, "ahead"),
    (lambda d: d.observe_check(-0.1), ValueError, "latency_s"),
    (lambda d: d.observe_check(math.inf), ValueError, "latency_s"),
    (lambda d: d.check_after_s(0.0), ValueError, "deadline_s"),
    (lambda d: d.check_timeout_s(-1.0), ValueError, "fastest_s"),
    (lambda d: d.first_check_s(0.0), ValueError, "deadline_s"),
    (lambda d: d.deadline_s(5, 0.0), ValueError, "ceiling_s"),
    (lambda d: d.deadline_s(5, math.nan), ValueError, "ceiling_s"),
    (lambda d: d.deadline_s(0, 1.0), ValueError, "rows"),
    (lambda d: d.deadline_s(5, 1.0, -1.0), ValueError, "fastest_s"),
    (lambda d: d.deadline_s(5, 1.0, math.inf), ValueError, "fastest_s"),
])
def test_bad_arguments_are_refused_by_name_and_change_nothing(call, error, name) -> None:
    d = _learnt(_same(8, 0.2, 0.15))
    before = d.deadline_s(5, CEILING)
    with pytest.raises(error, match=name):
        call(d)
    assert d.samples == 8 and d.checks == 0 and d.deadline_s(5, CEILING) == before


@pytest.mark.parametrize(("fields", "name"), [
    ({"floor_s": 0.0}, "floor_s"), ({"floor_s": math.inf}, "floor_s"), ({"quantile": 0.0}, "quantile"),
    ({"quantile": 1.5}, "quantile"), ({"server_mult": 0.9}, "server_mult"), ({"link_mult": 0.5}, "link_mult"),
    ({"margin_s": -0.1}, "margin_s"), ({"min_samples": 0}, "min_samples"), ({"window": 4}, "window"),
    ({"row_base": -1}, "row_base"), ({"check_floor_s": 0.0}, "check_floor_s"), ({"min_checks": 0}, "min_checks"),
    ({"min_checks": 65}, "window"), ({"min_trips": 0}, "min_trips"), ({"check_every_s": 0.0}, "check_every_s"),
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
