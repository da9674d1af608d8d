"""Properties of tandem_core.link_health over any sequence of calls (hypothesis), with the
extremes: clocks and RTT samples that are NaN, infinite, past the float range or of a wrong type.

- The circuit breaker refuses a bad clock (ValueError or TypeError naming `now`) before it changes
  anything, opens only after `failure_threshold` consecutive failures, and is never open for
  longer than `max_open_s` after the last call: no clock can keep it open forever.
- The RTT estimate stays finite and >= 0 whatever the samples, so the routing policy's
  `LinkView` built from it is always valid and `decide` always answers.
- `backoff_delay` is finite, within [0, cap_s] and never falls as the attempts grow.
Clocks are plain floats, as in test_link_health.py. Profiles: tests/support/fuzz.py.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tandem_core.link_health import CircuitBreaker, RttEstimator, backoff_delay, show_value
from tandem_core.routing import LinkView, RouteCosts, RouteRequest, decide
from tests.support.fuzz import fuzz, timeout_s

QUICK = 300
pytestmark = pytest.mark.timeout(timeout_s(20, QUICK))

HUGE = sys.float_info.max
BAD_CLOCKS = [math.nan, math.inf, -math.inf, 10**400, -(10**400), True, "1.0", None]
OPS = ("failure", "success", "state", "allow_probe", "until")


def _snapshot(b: CircuitBreaker, now: float) -> tuple[Any, ...]:
    return b.state(now), b.consecutive_failures, b.open_period_s, b.seconds_until_half_open(now)


def _call(b: CircuitBreaker, op: str, now: Any) -> None:
    {"failure": b.record_failure, "success": b.record_success, "state": b.state,
     "allow_probe": b.allow_probe, "until": b.seconds_until_half_open}[op](now)


# A step: an operation and either the clock's advance (a finite float >= 0) or a bad clock.
_STEP = st.tuples(st.sampled_from(OPS), st.one_of(
    st.floats(0.0, 100.0), st.sampled_from([0.0, 1e-9, 1e6, 1e300]), st.sampled_from(BAD_CLOCKS)))


@fuzz(QUICK)
@given(threshold=st.integers(1, 4), open_s=st.sampled_from([0.0, 1e-6, 1.0, 5.0, 1e300]),
       factor=st.sampled_from([1.0, 2.0, 12.0]), start=st.sampled_from([-1e300, -5.0, 0.0, 1e9, 1e300]),
       steps=st.lists(_STEP, max_size=60))
def test_fuzz_breaker_refuses_bad_clocks_and_is_never_open_forever(
    threshold: int, open_s: float, factor: float, start: float, steps: list[tuple[str, Any]]
) -> None:
    b = CircuitBreaker(failure_threshold=threshold, open_s=open_s, max_open_s=open_s * factor)
    now = start
    for op, step in steps:
        if not (isinstance(step, float) and math.isfinite(step)):
            before = _snapshot(b, now)
            with pytest.raises((ValueError, TypeError), match="now"):
                _call(b, op, step)
            assert _snapshot(b, now) == before, f"a bad clock ({step!r}) changed the breaker"
            continue
        now += step
        was = b.state(now)
        _call(b, op, now)
        if was == "closed" and b.state(now) == "open":
            assert op == "failure" and b.consecutive_failures >= threshold, "opened before the threshold"
        if was == "closed" and op == "failure" and b.consecutive_failures < threshold:
            assert b.state(now) == "closed"
    end = now + b.max_open_s
    assert b.state(end) != "open", f"still open {b.max_open_s} s after the last call at {now}"
    assert b.allow_probe(end)


@pytest.mark.parametrize("bad", BAD_CLOCKS, ids=show_value)
def test_a_bad_clock_neither_opens_the_circuit_nor_keeps_it_open(bad: Any) -> None:
    closed = CircuitBreaker(failure_threshold=1, open_s=5.0)
    with pytest.raises((ValueError, TypeError), match="now"):
        closed.record_failure(bad)
    assert closed.state(0.0) == "closed" and closed.consecutive_failures == 0
    opened = CircuitBreaker(failure_threshold=1, open_s=5.0)
    opened.record_failure(100.0)
    for op in OPS:
        with pytest.raises((ValueError, TypeError), match="now"):
            _call(opened, op, bad)
    assert opened.state(104.9) == "open"
    assert opened.state(105.0) == "half_open"


_SAMPLE = st.one_of(st.floats(0.0, 1e4), st.floats(min_value=0.0, allow_infinity=False),
                    st.sampled_from([0.0, math.ulp(0.0), 1e300, HUGE]), st.sampled_from([-1.0, *BAD_CLOCKS]))


@fuzz(QUICK)
@given(samples=st.lists(_SAMPLE, max_size=40), circuit=st.sampled_from(["closed", "open", "half_open"]))
def test_fuzz_rtt_stays_finite_so_routing_always_answers(samples: list[Any], circuit: str) -> None:
    est = RttEstimator()
    for r in samples:
        before = est.rtt_ms, est.jitter_ms, est.samples
        if isinstance(r, float) and math.isfinite(r) and r >= 0:
            est.observe(r)
        else:
            with pytest.raises((ValueError, TypeError), match="rtt_ms"):
                est.observe(r)
            assert (est.rtt_ms, est.jitter_ms, est.samples) == before
        for value in (est.rtt_ms, est.jitter_ms):
            assert value is None or (math.isfinite(value) and value >= 0)
    view = LinkView(circuit=circuit, rtt_ms=est.rtt_ms, jitter_ms=est.jitter_ms, configured=True)
    d = decide(RouteRequest(prompt_tokens=50, max_new_tokens=64), view, RouteCosts())
    assert all(math.isfinite(e.total_ms) for e in d.estimates.values())


@fuzz(QUICK)
@given(attempt=st.one_of(st.integers(0, 70), st.integers(0, 10**30)), base_s=st.one_of(
    st.floats(0.0, 10.0), st.floats(min_value=0.0, allow_infinity=False), st.sampled_from([0.0, math.ulp(0.0)])),
    cap_s=st.sampled_from([0.0, 0.5, 5.0, HUGE]))
def test_fuzz_backoff_is_finite_capped_and_never_shrinks(attempt: int, base_s: float, cap_s: float) -> None:
    d = backoff_delay(attempt, base_s, cap_s)
    assert math.isfinite(d) and 0.0 <= d <= cap_s
    assert backoff_delay(attempt + 1, base_s, cap_s) >= d


@pytest.mark.parametrize("attempt, base_s, cap_s, field", [
    (-1, 1.0, 5.0, "attempt"), (1.5, 1.0, 5.0, "attempt"), (True, 1.0, 5.0, "attempt"),
    (0, math.nan, 5.0, "base_s"), (0, 10**400, 5.0, "base_s"), (0, 1.0, math.nan, "cap_s"),
    (0, 1.0, -1.0, "cap_s"),
], ids=show_value)
def test_backoff_refuses_bad_arguments(attempt: Any, base_s: Any, cap_s: Any, field: str) -> None:
    with pytest.raises((ValueError, TypeError), match=field):
        backoff_delay(attempt, base_s, cap_s)
