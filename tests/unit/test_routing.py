"""Unit tests for tandem_core.routing: a decision table over every input, the speed model's
formulas and trends, and input validation. Costs are explicit so defaults can change freely."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from itertools import pairwise
from typing import Any

import pytest

from tandem_core.routing import (
    ROUTE_CLOUD,
    ROUTE_LOCAL,
    ROUTE_SPECULATIVE,
    ROUTES,
    InvalidField,
    LinkView,
    RouteCosts,
    RouteDecision,
    RouteRequest,
    decide,
    estimate_routes,
    expected_tokens_per_round,
)

# Device: 200 tok/s prefill, 40 tok/s drafting; cloud: 2000 tok/s prefill, 20 tok/s decoding.
# At RTT 0 a round of k=4 takes 100 + 30 ms, so speculation beats the cloud's 20 tok/s only when
# E / 0.13 s > 20 with E = 4a + 1, i.e. acceptance above 0.4.
COSTS = RouteCosts(
    device_prefill_tps=200.0,
    device_decode_tps=40.0,
    cloud_prefill_tps=2000.0,
    cloud_decode_tps=20.0,
    verify_ms=30.0,
    draft_len=4,
    acceptance_prior=0.6,
    rtt_prior_ms=50.0,
)

UP0 = LinkView(circuit="closed", rtt_ms=0.0, jitter_ms=0.0, configured=True)
UP20 = replace(UP0, rtt_ms=20.0)
UP300 = replace(UP0, rtt_ms=300.0, jitter_ms=40.0)
UP_UNMEASURED = replace(UP0, rtt_ms=None, jitter_ms=None)
OPEN = replace(UP0, circuit="open")
HALF_OPEN = replace(UP0, circuit="half_open")
UNCONFIGURED = replace(UP0, configured=False)

SHORT, LONG = 50, 4000  # prompt tokens


def req(**kw: Any) -> RouteRequest:
    base: dict[str, Any] = {
        "prompt_tokens": SHORT,
        "max_new_tokens": 128,
        "acceptance": 0.8,
        "category": "code",
    }
    return RouteRequest(**{**base, **kw})


CLOUD_Q = {"private_context": True, "privacy_mode": "cloud_quality"}
STRICT_PRIVATE = {"private_context": True, "privacy_mode": "strict"}

# (id, link, request, expected route, keyword in the reason, expected drop_private)
TABLE = [
    # link state
    ("rtt0-acc0.8-code-short", UP0, req(), ROUTE_SPECULATIVE, "acceptance 0.80 on code", False),
    ("circuit-open", OPEN, req(), ROUTE_LOCAL, "circuit open", False),
    ("circuit-half-open", HALF_OPEN, req(), ROUTE_LOCAL, "circuit half_open", False),
    ("link-not-configured", UNCONFIGURED, req(), ROUTE_LOCAL, "no cloud link", False),
    # acceptance 0.6: speculative at RTT 0 (26 tok/s), cloud once the 50 ms prior is added (18.9)
    ("rtt-not-measured-uses-prior", UP_UNMEASURED, req(acceptance=0.6), ROUTE_CLOUD, "assuming 50 ms", False),
    # RTT and acceptance
    ("rtt300-acc0.8", UP300, req(), ROUTE_CLOUD, "rtt 300", False),
    ("rtt20-acc0.95", UP20, req(acceptance=0.95), ROUTE_SPECULATIVE, "acceptance 0.95", False),
    ("rtt0-acc0.2", UP0, req(acceptance=0.2), ROUTE_CLOUD, "acceptance 0.20", False),
    ("rtt0-acc-unknown", UP0, req(acceptance=None), ROUTE_SPECULATIVE, "assuming 0.60", False),
    # prompt length
    ("rtt0-acc0.8-long-prompt", UP0, req(prompt_tokens=LONG), ROUTE_CLOUD, "vs speculative", False),
    # deadline (64 new tokens: local 1.85 s, speculative 2.36 s, cloud 3.23 s)
    (
        "deadline-only-speculative-fits",
        UP0,
        req(max_new_tokens=64, deadline_ms=3000),
        ROUTE_SPECULATIVE,
        "cloud 20.0 tok/s, TTFT 25 ms, done in 3.2 s (misses the deadline of 3000 ms)",
        False,
    ),
    (
        "deadline-only-local-fits",
        UP0,
        req(max_new_tokens=64, deadline_ms=2000),
        ROUTE_LOCAL,
        "neither cloud route meets the deadline of 2000 ms",
        False,
    ),
    (
        "deadline-nothing-fits-fastest-local",
        UP0,
        req(max_new_tokens=64, deadline_ms=1000),
        ROUTE_LOCAL,
        "cannot be met",
        False,
    ),
    # TTFT budget (speculative TTFT 380 ms, cloud 25 ms, local 250 ms)
    (
        "ttft-budget-excludes-speculative",
        UP0,
        req(ttft_budget_ms=100),
        ROUTE_CLOUD,
        "misses the TTFT budget of 100 ms",
        False,
    ),
    (
        "ttft-budget-local-fits",
        UP300,
        req(ttft_budget_ms=300),
        ROUTE_LOCAL,
        "neither cloud route meets the TTFT budget",
        False,
    ),
    (
        "ttft-budget-nothing-fits-fastest-cloud",
        UP0,
        req(prompt_tokens=LONG, ttft_budget_ms=100),
        ROUTE_CLOUD,
        "cannot be met",
        False,
    ),
    # privacy
    ("private-strict", UP0, req(**STRICT_PRIVATE), ROUTE_LOCAL, "private context stays", False),
    ("not-private-strict", UP0, req(privacy_mode="strict"), ROUTE_SPECULATIVE, "link up", False),
    ("private-cloud-quality", UP0, req(**CLOUD_Q), ROUTE_SPECULATIVE, "withheld", True),
    ("private-cloud-quality-link-open", OPEN, req(**CLOUD_Q), ROUTE_LOCAL, "circuit open", False),
    # history holding an answer drawn from private documents: local in every mode, whatever is asked
    ("private-history-strict", UP0, req(private_history=True), ROUTE_LOCAL, "holds an answer drawn", False),
    ("private-history-cloud-quality", UP0, req(private_history=True, **CLOUD_Q), ROUTE_LOCAL, "stays on the device",
     False),
    ("private-history-override-cloud", UP0, req(private_history=True, privacy_mode="cloud_quality", override="cloud"),
     ROUTE_LOCAL, "requested cloud route would send it", False),
    # overrides
    ("override-local", UP0, req(override="local"), ROUTE_LOCAL, "requested by the client", False),
    (
        "override-speculative-high-rtt",
        UP300,
        req(override="speculative"),
        ROUTE_SPECULATIVE,
        "requested by the client",
        False,
    ),
    ("override-cloud", UP0, req(override="cloud"), ROUTE_CLOUD, "requested by the client", False),
    (
        "override-speculative-misses-deadline",
        UP300,
        req(override="speculative", deadline_ms=2000),
        ROUTE_SPECULATIVE,
        "misses the deadline of 2000 ms",
        False,
    ),
    (
        "override-cloud-blocked-by-privacy",
        UP0,
        req(override="cloud", **STRICT_PRIVATE),
        ROUTE_LOCAL,
        "requested cloud route would send it to the cloud",
        False,
    ),
    (
        "override-cloud-blocked-by-open-circuit",
        OPEN,
        req(override="cloud"),
        ROUTE_LOCAL,
        "cloud was requested but the cloud link is down (circuit open)",
        False,
    ),
    (
        "override-speculative-blocked-unconfigured",
        UNCONFIGURED,
        req(override="speculative"),
        ROUTE_LOCAL,
        "speculative was requested but no cloud link",
        False,
    ),
    (
        "override-cloud-private-cloud-quality",
        UP0,
        req(override="cloud", **CLOUD_Q),
        ROUTE_CLOUD,
        "withheld",
        True,
    ),
    (
        "override-local-private-cloud-quality",
        UP0,
        req(override="local", **CLOUD_Q),
        ROUTE_LOCAL,
        "requested by the client",
        False,
    ),
]


IDS = [row[0] for row in TABLE]


@pytest.mark.parametrize("link, request_, route, keyword, drop", [r[1:] for r in TABLE], ids=IDS)
def test_decision_table(
    link: LinkView, request_: RouteRequest, route: str, keyword: str, drop: bool
) -> None:
    d = decide(request_, link, COSTS)
    assert d.route == route, d.reason
    assert keyword in d.reason
    assert d.drop_private is drop


def _link_usable(link: LinkView) -> bool:
    return link.configured and link.circuit == "closed"


@pytest.mark.parametrize("link, request_", [row[1:3] for row in TABLE], ids=IDS)
def test_decision_properties(link: LinkView, request_: RouteRequest) -> None:
    d = decide(request_, link, COSTS)
    assert d.reason.startswith(f"{d.route}: ") and len(d.reason) > len(d.route) + 10
    assert d.route in d.estimates
    weighed_all = (
        _link_usable(link)
        and request_.override != ROUTE_LOCAL
        and not (request_.private_context and request_.privacy_mode == "strict")
        and not request_.private_history
    )
    assert set(d.estimates) == (set(ROUTES) if weighed_all else {ROUTE_LOCAL})
    for est in d.estimates.values():
        assert math.isfinite(est.total_ms) and est.total_ms >= est.ttft_ms >= 0
        assert est.tokens_per_s > 0
    assert decide(request_, link, COSTS) == d  # deterministic
    json.dumps(d.to_dict())  # plain JSON types
    if d.drop_private:
        assert d.route != ROUTE_LOCAL


def test_estimates_follow_the_speed_model() -> None:
    est = estimate_routes(req(), rtt_ms=10.0, acceptance=0.8, costs=COSTS)
    e = 0.8 * 4 + 1
    round_ms = 4 / 40 * 1000 + 30 + 10
    assert est[ROUTE_LOCAL].ttft_ms == pytest.approx(250.0)
    assert est[ROUTE_LOCAL].tokens_per_s == pytest.approx(40.0)
    assert est[ROUTE_CLOUD].ttft_ms == pytest.approx(25.0 + 10.0)
    assert est[ROUTE_CLOUD].total_ms == pytest.approx(35.0 + 128 / 20 * 1000)
    assert est[ROUTE_SPECULATIVE].ttft_ms == pytest.approx(max(250.0, 35.0) + round_ms)
    assert est[ROUTE_SPECULATIVE].tokens_per_s == pytest.approx(e / round_ms * 1000)


@pytest.mark.parametrize(
    "a, k, expected", [(0.0, 4, 1.0), (1.0, 4, 5.0), (0.5, 4, 3.0), (0.8, 1, 1.8), (0.456, 4, 2.824)]
)
def test_expected_tokens_per_round(a: float, k: int, expected: float) -> None:
    assert expected_tokens_per_round(a, k) == pytest.approx(expected)


def test_speculative_rate_falls_with_rtt_and_rises_with_acceptance() -> None:
    def spec_rate(rtt: float, a: float) -> float:
        return estimate_routes(req(), rtt, a, COSTS)[ROUTE_SPECULATIVE].tokens_per_s

    rtts = [0.0, 10.0, 50.0, 300.0]
    accs = [0.0, 0.3, 0.6, 0.9, 1.0]
    assert all(spec_rate(x, 0.8) > spec_rate(y, 0.8) for x, y in pairwise(rtts))
    assert all(spec_rate(0.0, x) < spec_rate(0.0, y) for x, y in pairwise(accs))
    for a in accs:  # acceptance moves speculation only
        est = estimate_routes(req(), 0.0, a, COSTS)
        assert est[ROUTE_CLOUD].tokens_per_s == 20.0 and est[ROUTE_LOCAL].tokens_per_s == 40.0


def test_a_tie_between_cloud_routes_goes_to_speculative() -> None:
    # k=1 at 10 tok/s, no verify cost, RTT 0, a=0: one token per 100 ms round. With an empty
    # prompt and one new token both cloud routes finish at exactly 200 ms.
    costs = replace(COSTS, device_decode_tps=10.0, cloud_decode_tps=5.0, verify_ms=0.0, draft_len=1)
    d = decide(req(prompt_tokens=0, max_new_tokens=1, acceptance=0.0), UP0, costs)
    assert d.estimates[ROUTE_SPECULATIVE].total_ms == d.estimates[ROUTE_CLOUD].total_ms == 200.0
    assert d.route == ROUTE_SPECULATIVE


def test_decision_is_a_frozen_value() -> None:
    d = decide(req(), UP0, COSTS)
    assert isinstance(d, RouteDecision)
    with pytest.raises(AttributeError):
        d.route = ROUTE_CLOUD  # type: ignore[misc]


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: replace(UP0, circuit="broken"), "circuit"),
        (lambda: replace(UP0, rtt_ms=-1.0), "rtt_ms"),
        (lambda: replace(UP0, jitter_ms=math.nan), "jitter_ms"),
        (lambda: replace(UP0, configured="yes"), "configured"),  # type: ignore[arg-type]
        (lambda: replace(COSTS, device_decode_tps=0.0), "device_decode_tps"),
        (lambda: replace(COSTS, cloud_prefill_tps=math.inf), "cloud_prefill_tps"),
        (lambda: replace(COSTS, verify_ms=-5.0), "verify_ms"),
        (lambda: replace(COSTS, draft_len=0), "draft_len"),
        (lambda: replace(COSTS, acceptance_prior=1.5), "acceptance_prior"),
        (lambda: replace(COSTS, rtt_prior_ms="50"), "rtt_prior_ms"),  # type: ignore[arg-type]
        (lambda: req(override="gpu"), "override"),
        (lambda: req(prompt_tokens=-1), "prompt_tokens"),
        (lambda: req(prompt_tokens=3.5), "prompt_tokens"),
        (lambda: req(max_new_tokens=0), "max_new_tokens"),
        (lambda: req(deadline_ms=0), "deadline_ms"),
        (lambda: req(ttft_budget_ms=-10), "ttft_budget_ms"),
        (lambda: req(private_context=1), "private_context"),
        (lambda: req(private_history="yes"), "private_history"),
        (lambda: req(privacy_mode="lax"), "privacy_mode"),
        (lambda: req(acceptance=1.2), "acceptance"),
        (lambda: req(acceptance=math.nan), "acceptance"),
        (lambda: req(category=""), "category"),
    ],
)
def test_bad_inputs_name_the_field(make: Any, field: str) -> None:
    with pytest.raises(InvalidField) as info:
        make()
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
