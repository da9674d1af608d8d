"""Unit tests for tandem_core.link_health: breaker transitions, RTT/jitter, acceptance EWMA,
prompt categories. Clocks are plain floats."""

from __future__ import annotations

import math

import pytest

from tandem_core.link_health import (
    AcceptanceTracker,
    CircuitBreaker,
    RttEstimator,
    classify_prompt,
)


def _fail(breaker: CircuitBreaker, now: float, times: int) -> None:
    for _ in range(times):
        breaker.record_failure(now)


# ---- CircuitBreaker ----------------------------------------------------------------------------


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    b = CircuitBreaker(failure_threshold=3, open_s=5.0)
    _fail(b, 0.0, 2)
    assert b.state(0.0) == "closed"
    assert b.consecutive_failures == 2
    b.record_failure(0.1)
    assert b.state(0.1) == "open"
    assert b.consecutive_failures == 3
    assert not b.allow_probe(0.1)
    assert b.seconds_until_half_open(1.1) == pytest.approx(4.0)


def test_success_resets_the_failure_count_while_closed() -> None:
    b = CircuitBreaker(failure_threshold=3)
    _fail(b, 0.0, 2)
    b.record_success(0.5)
    assert b.consecutive_failures == 0
    _fail(b, 1.0, 2)
    assert b.state(1.0) == "closed"


def test_open_turns_half_open_after_open_s_and_a_success_closes_it() -> None:
    b = CircuitBreaker(failure_threshold=1, open_s=5.0)
    b.record_failure(10.0)
    assert b.state(14.999) == "open"
    assert b.state(15.0) == "half_open"
    assert b.allow_probe(15.0)
    b.record_success(15.2)
    assert b.state(15.2) == "closed"
    assert b.consecutive_failures == 0
    assert b.open_period_s == 5.0


def test_half_open_failure_reopens_with_doubled_period_up_to_the_cap() -> None:
    b = CircuitBreaker(failure_threshold=1, open_s=5.0, max_open_s=12.0)
    b.record_failure(0.0)  # open for 5 s
    b.record_failure(5.0)  # half_open probe fails: open for 10 s
    assert b.state(5.0) == "open"
    assert b.open_period_s == 10.0
    assert b.state(14.9) == "open"
    assert b.state(15.0) == "half_open"
    b.record_failure(15.0)  # fails again: 20 s capped at 12 s
    assert b.open_period_s == 12.0
    assert b.state(26.9) == "open"
    assert b.state(27.0) == "half_open"
    b.record_success(27.0)  # closing resets the period
    assert b.state(27.0) == "closed"
    assert b.open_period_s == 5.0
    b.record_failure(30.0)
    assert b.state(34.9) == "open" and b.state(35.0) == "half_open"


def test_late_results_while_open_change_no_state() -> None:
    b = CircuitBreaker(failure_threshold=2, open_s=5.0)
    _fail(b, 0.0, 2)
    b.record_success(1.0)  # an answer to a request sent before it opened
    assert b.state(1.0) == "open"
    b.record_failure(2.0)
    assert b.state(4.9) == "open"  # not extended
    assert b.state(5.0) == "half_open"
    assert b.consecutive_failures == 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_threshold": True}, "failure_threshold"),
        ({"open_s": -1.0}, "open_s"),
        ({"open_s": math.nan}, "open_s"),
        ({"open_s": 10.0, "max_open_s": 5.0}, "max_open_s"),
    ],
)
def test_breaker_rejects_bad_arguments(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises((ValueError, TypeError), match=field):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]


# ---- RttEstimator ------------------------------------------------------------------------------


def test_rtt_starts_unknown_and_follows_rfc6298_first_sample() -> None:
    est = RttEstimator()
    assert est.rtt_ms is None and est.jitter_ms is None
    est.observe(100.0)
    assert est.rtt_ms == 100.0
    assert est.jitter_ms == 50.0
    est.observe(60.0)  # RTTVAR = 3/4*50 + 1/4*40 = 47.5; SRTT = 7/8*100 + 1/8*60 = 95
    assert est.jitter_ms == pytest.approx(47.5)
    assert est.rtt_ms == pytest.approx(95.0)


def test_rtt_converges_to_a_steady_link_and_jitter_decays() -> None:
    est = RttEstimator()
    est.observe(300.0)
    for _ in range(100):
        est.observe(20.0)
    assert est.rtt_ms == pytest.approx(20.0, abs=0.1)
    assert est.jitter_ms is not None and est.jitter_ms < 0.5
    assert est.samples == 101


def test_jitter_grows_with_variance() -> None:
    steady, noisy = RttEstimator(), RttEstimator()
    for i in range(200):
        steady.observe(50.0 + (1.0 if i % 2 else -1.0))
        noisy.observe(50.0 + (30.0 if i % 2 else -30.0))
    assert steady.rtt_ms == pytest.approx(50.0, abs=2.0)
    assert noisy.rtt_ms == pytest.approx(50.0, abs=10.0)
    assert steady.jitter_ms is not None and noisy.jitter_ms is not None
    assert noisy.jitter_ms > 10 * steady.jitter_ms


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan])
def test_rtt_rejects_bad_samples(bad: float) -> None:
    with pytest.raises(ValueError, match="rtt_ms"):
        RttEstimator().observe(bad)


# ---- AcceptanceTracker -------------------------------------------------------------------------


def test_acceptance_ewma_per_key_and_overall() -> None:
    t = AcceptanceTracker(alpha=0.5)
    assert t.get("code") is None and t.overall() is None and t.snapshot() == {}
    t.observe("code", 0.9)
    t.observe("chat", 0.3)
    t.observe("code", 0.5)
    assert t.get("code") == pytest.approx(0.7)  # 0.5*0.9 + 0.5*0.5
    assert t.get("chat") == pytest.approx(0.3)
    assert t.overall() == pytest.approx(0.5 * (0.5 * 0.9 + 0.5 * 0.3) + 0.5 * 0.5)
    assert t.snapshot() == {"chat": pytest.approx(0.3), "code": pytest.approx(0.7)}
    snap = t.snapshot()
    snap["code"] = 0.0
    assert t.get("code") == pytest.approx(0.7)  # a copy


def test_acceptance_forgets_least_recently_updated_key() -> None:
    t = AcceptanceTracker(max_keys=2)
    t.observe("a", 0.1)
    t.observe("b", 0.2)
    t.observe("a", 0.1)
    t.observe("c", 0.3)
    assert set(t.snapshot()) == {"a", "c"}


@pytest.mark.parametrize(
    "key, rate, field",
    [("", 0.5, "key"), ("x", 1.5, "rate"), ("x", -0.1, "rate"), ("x", math.nan, "rate")],
)
def test_acceptance_rejects_bad_input(key: str, rate: float, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AcceptanceTracker().observe(key, rate)


# ---- classify_prompt ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, category",
    [
        ("Write a Python function `fibonacci(n)` that returns the n-th Fibonacci number.", "code"),
        ("def add(a, b):\n    return a + b\n", "code"),
        ("```\nls -la\n```", "code"),
        ("Give me a regex for email addresses", "code"),
        ("SELECT name FROM users WHERE age > 30", "code"),
        ("if (x == 1) { y = 2; }", "code"),
        ("hi there, how are you?", "chat"),
        ("What is the capital of France?", "chat"),
        ("", "chat"),
        ("Tell a short story about a lighthouse keeper who finds a message in a bottle.", "prose"),
        (
            (
                "The river wound through the valley for miles, past farms and old stone bridges, "
                "and by evening the light on the water had turned from silver to a deep gold; "
                "the travellers stopped to rest beneath the willows."
            ),
            "prose",
        ),
    ],
)
def test_classify_prompt(text: str, category: str) -> None:
    assert classify_prompt(text) == category
    assert classify_prompt(text) == category  # deterministic


def test_classify_prompt_rejects_non_text() -> None:
    with pytest.raises(TypeError, match="text"):
        classify_prompt(None)  # type: ignore[arg-type]
