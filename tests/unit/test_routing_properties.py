"""Properties of tandem_core.routing over every input (hypothesis), and its limits to the
millisecond.

- Any inputs, valid, extreme (5e-324 tokens/s, 1e308 ms, 2**53 tokens) or bad (NaN, infinities,
  ints past the float range, wrong types): building them raises only `InvalidField` naming the
  field, and `decide` returns a decision whose estimates are finite, never an exception.
- Valid inputs, however extreme, always give a decision.
- A route exactly on the deadline or the TTFT budget meets it; one millisecond less and it misses.
Profiles: tests/support/fuzz.py (`-k fuzz` with TANDEM_FUZZ_EXAMPLES runs the long one).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tandem_core.link_health import show_value
from tandem_core.routing import (
    CIRCUIT_STATES,
    ESTIMATE_CAP_MS,
    MAX_COUNT,
    PRIVACY_MODES,
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
    meets_budget,
)
from tests.support.fuzz import fuzz, timeout_s

QUICK = 300
pytestmark = pytest.mark.timeout(timeout_s(20, QUICK))

TINY, HUGE = math.ulp(0.0), sys.float_info.max  # 5e-324 and 1.8e308
BAD_NUMBERS = [math.nan, math.inf, -math.inf, -1.0, -TINY, 10**400, True, "1", None]
BAD_COUNTS = [-1, MAX_COUNT + 1, 10**400, 1.0, math.nan, math.inf, True, "3"]

# ---- strategies: each field's valid range with its extremes, and values it must refuse --------


def _positive() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(min_value=0.0, exclude_min=True, allow_infinity=False),
                     st.sampled_from([TINY, sys.float_info.min, 1e-300, 1.0, 1e300, HUGE]))


def _non_negative() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(min_value=0.0, allow_infinity=False), st.sampled_from([0.0, TINY, 1e300, HUGE]))


def _fraction() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, TINY, 1.0 - 2**-53, 1.0]))


def _count(low: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(low, 10**6), st.integers(low, MAX_COUNT), st.sampled_from([low, MAX_COUNT]))


# field -> (its valid values, extremes included; values it must refuse, beside any float)
_RATE = (_positive(), [*BAD_NUMBERS, 0.0])
_TIME = (_non_negative(), BAD_NUMBERS)
_LIMIT = (st.one_of(st.none(), _count(1)), [*BAD_COUNTS, 0])
FIELDS: dict[type, dict[str, tuple[st.SearchStrategy[Any], list[Any]]]] = {
    RouteCosts: {
        "device_prefill_tps": _RATE, "device_decode_tps": _RATE, "cloud_prefill_tps": _RATE,
        "cloud_decode_tps": _RATE, "verify_ms": _TIME, "draft_len": (_count(1), [*BAD_COUNTS, 0]),
        "acceptance_prior": (_fraction(), [*BAD_NUMBERS, 1.5]), "rtt_prior_ms": _TIME,
    },
    LinkView: {
        "circuit": (st.sampled_from(CIRCUIT_STATES), ["broken", "", None, 0]),
        "rtt_ms": (st.one_of(st.none(), _non_negative()), BAD_NUMBERS[:-1]),
        "jitter_ms": (st.one_of(st.none(), _non_negative()), BAD_NUMBERS[:-1]),
        "configured": (st.booleans(), [1, 0, "yes", None]),
    },
    RouteRequest: {
        "prompt_tokens": (_count(0), BAD_COUNTS), "max_new_tokens": (_count(1), [*BAD_COUNTS, 0]),
        "override": (st.sampled_from([None, *ROUTES]), ["gpu", "", 1]),
        "deadline_ms": _LIMIT, "ttft_budget_ms": _LIMIT,
        "private_context": (st.booleans(), [0, 1, "no", None]),
        "private_history": (st.booleans(), [0, 1, "no", None]),
        "privacy_mode": (st.sampled_from(PRIVACY_MODES), ["lax", "", None]),
        "acceptance": (st.one_of(st.none(), _fraction()), [*BAD_NUMBERS[:-1], 1.5]),
        "category": (st.sampled_from([None, "code", "chat", "prose"]), ["", 3]),
    },
}


def _valid(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({name: valid for name, (valid, _) in FIELDS[cls].items()})


@st.composite
def _spoiled(draw: st.DrawFn) -> dict[type, dict[str, Any]]:
    """Valid inputs of all three kinds with one to three fields set to a value out of range or of
    the wrong type (a refused value, or any float: NaN, infinities, negatives)."""
    inputs = {cls: draw(_valid(cls)) for cls in FIELDS}
    for _ in range(draw(st.integers(1, 3))):
        cls = draw(st.sampled_from(list(FIELDS)))
        name = draw(st.sampled_from(list(FIELDS[cls])))
        inputs[cls][name] = draw(st.one_of(st.sampled_from(FIELDS[cls][name][1]), st.floats()))
    return inputs


def _field_names(*classes: type) -> set[str]:
    return {f.name for c in classes for f in fields(c)}


def assert_sound(d: RouteDecision, request: RouteRequest, link: LinkView, costs: RouteCosts) -> None:
    """What `decide` guarantees of every decision (module docstring of tandem_core.routing)."""
    assert d.route in ROUTES and d.route in d.estimates
    assert d.reason.startswith(f"{d.route}: ")
    for route, est in d.estimates.items():
        assert all(math.isfinite(x) for x in (est.ttft_ms, est.tokens_per_s, est.total_ms)), (route, est)
        assert 0 <= est.ttft_ms <= est.total_ms <= ESTIMATE_CAP_MS, (route, est)
        assert est.tokens_per_s > 0, (route, est)
        if est.total_ms == ESTIMATE_CAP_MS and request.deadline_ms is not None:
            assert not meets_budget(request, est), "a saturated estimate met a deadline"
    if d.drop_private:
        assert d.route != ROUTE_LOCAL
    json.dumps(d.to_dict(), allow_nan=False)  # plain, finite JSON
    assert decide(request, link, costs) == d  # deterministic


# ---- properties ------------------------------------------------------------------------------


@fuzz(QUICK)
@given(inputs=_spoiled())
def test_fuzz_decide_returns_finite_estimates_or_raises_invalid_field(inputs: dict[type, dict[str, Any]]) -> None:
    try:
        c, lv, r = RouteCosts(**inputs[RouteCosts]), LinkView(**inputs[LinkView]), RouteRequest(**inputs[RouteRequest])
    except InvalidField as exc:
        assert exc.field in _field_names(RouteCosts, LinkView, RouteRequest)
        assert str(exc).startswith(f"{exc.field}: ") and len(str(exc)) < 200
        return
    assert_sound(decide(r, lv, c), r, lv, c)


@fuzz(QUICK)
@given(costs=_valid(RouteCosts), link=_valid(LinkView), request=_valid(RouteRequest))
def test_fuzz_valid_extreme_inputs_always_decide(
    costs: dict[str, Any], link: dict[str, Any], request: dict[str, Any]
) -> None:
    c, lv, r = RouteCosts(**costs), LinkView(**link), RouteRequest(**request)
    assert_sound(decide(r, lv, c), r, lv, c)


UP = LinkView(circuit="closed", rtt_ms=0.0, jitter_ms=0.0, configured=True)


@pytest.mark.parametrize("costs", [
    {"device_decode_tps": TINY},  # a speculative round of 4/5e-324 s: its rate underflowed to 0
    {"cloud_decode_tps": TINY},
    {"device_prefill_tps": TINY},
    {"verify_ms": HUGE},
    {"device_decode_tps": HUGE, "verify_ms": 0.0},  # a round of ~0 ms: an overflowing rate
    {"draft_len": MAX_COUNT},
], ids=lambda kw: ",".join(f"{k}={v:g}" for k, v in kw.items()))
def test_valid_extreme_costs_give_finite_estimates(costs: dict[str, Any]) -> None:
    c = RouteCosts(**costs)
    for r in (RouteRequest(0, 1), RouteRequest(MAX_COUNT, MAX_COUNT, deadline_ms=MAX_COUNT)):
        assert_sound(decide(r, UP, c), r, UP, c)


BASE: dict[type, dict[str, Any]] = {
    RouteCosts: {}, LinkView: {"circuit": "closed", "rtt_ms": 10.0, "jitter_ms": 1.0, "configured": True},
    RouteRequest: {"prompt_tokens": 10, "max_new_tokens": 10},
}
REFUSED = [(cls, name, bad) for cls, names in FIELDS.items() for name, (_, refused) in names.items() for bad in refused]


@pytest.mark.parametrize("cls, name, bad", REFUSED,
                         ids=[f"{c.__name__}.{n}={show_value(b)}" for c, n, b in REFUSED])
def test_every_field_refuses_its_bad_values_naming_the_field(cls: type, name: str, bad: Any) -> None:
    """NaN and infinite RTTs, counts past 2**53, wrong types: each refused by the field itself."""
    with pytest.raises(InvalidField) as info:
        cls(**{**BASE[cls], name: bad})
    assert info.value.field == name


# ---- exactly on a limit ----------------------------------------------------------------------

# Every number of this model is exact in binary floating point (ms):
#   local       TTFT 100 tokens / 500 tok/s = 200; + 10 tokens at 50 tok/s = 400
#   cloud       TTFT 100 / 1000 tok/s + RTT 50 = 150; + 10 tokens at 20 tok/s = 650
#   speculative round 2 / 50 tok/s + verify 10 + RTT 50 = 100 ms for E = 0.5 * 2 + 1 = 2 tokens
#               (20 tok/s); TTFT max(200, 150) + 100 = 300; + 10 tokens = 800
EXACT_COSTS = RouteCosts(device_prefill_tps=500.0, device_decode_tps=50.0, cloud_prefill_tps=1000.0,
                         cloud_decode_tps=20.0, verify_ms=10.0, draft_len=2, acceptance_prior=0.5, rtt_prior_ms=50.0)
EXACT_LINK = LinkView(circuit="closed", rtt_ms=50.0, jitter_ms=0.0, configured=True)
EXACT = {ROUTE_LOCAL: (200.0, 400.0), ROUTE_CLOUD: (150.0, 650.0), ROUTE_SPECULATIVE: (300.0, 800.0)}

MEETS_CLOUD, NEITHER_CLOUD, NONE_MEETS = "est.", "neither cloud route meets", "cannot be met by any route"
# (id, override, deadline_ms, ttft_budget_ms, route, in the reason, not in the reason)
LIMITS = [
    ("cloud-exactly-on-the-deadline", None, 650, None, ROUTE_CLOUD, MEETS_CLOUD, NEITHER_CLOUD),
    ("cloud-1ms-past-the-deadline", None, 649, None, ROUTE_LOCAL, NEITHER_CLOUD + " the deadline of 649", NONE_MEETS),
    ("cloud-exactly-on-the-ttft-budget", None, None, 150, ROUTE_CLOUD, MEETS_CLOUD, NEITHER_CLOUD),
    ("cloud-1ms-past-the-ttft-budget", None, None, 149, ROUTE_LOCAL, NONE_MEETS, NEITHER_CLOUD),
    ("cloud-exactly-on-both", None, 650, 150, ROUTE_CLOUD, MEETS_CLOUD, NEITHER_CLOUD),
    ("local-exactly-on-the-deadline", None, 400, None, ROUTE_LOCAL, NEITHER_CLOUD, NONE_MEETS),
    ("local-1ms-past-the-deadline", None, 399, None, ROUTE_LOCAL, NONE_MEETS, NEITHER_CLOUD),
    ("local-exactly-on-both", None, 400, 200, ROUTE_LOCAL, NEITHER_CLOUD, NONE_MEETS),
    ("local-1ms-past-the-ttft-budget", None, 400, 199, ROUTE_LOCAL, NONE_MEETS, NEITHER_CLOUD),
    ("speculative-exactly-on-the-deadline", ROUTE_SPECULATIVE, 800, None, ROUTE_SPECULATIVE, "requested", "misses"),
    ("speculative-1ms-past-the-deadline", ROUTE_SPECULATIVE, 799, None, ROUTE_SPECULATIVE,
     "(misses the deadline of 799 ms)", "TTFT budget"),
    ("speculative-exactly-on-the-ttft-budget", ROUTE_SPECULATIVE, None, 300, ROUTE_SPECULATIVE, "requested", "misses"),
    ("speculative-1ms-past-the-ttft-budget", ROUTE_SPECULATIVE, None, 299, ROUTE_SPECULATIVE,
     "(misses the TTFT budget of 299 ms)", "deadline"),
    # which limit the reason says it misses: not the one it sits exactly on
    ("speculative-on-the-deadline-past-the-ttft-budget", ROUTE_SPECULATIVE, 800, 299, ROUTE_SPECULATIVE,
     "(misses the TTFT budget of 299 ms)", "deadline"),
    ("speculative-on-the-ttft-budget-past-the-deadline", ROUTE_SPECULATIVE, 799, 300, ROUTE_SPECULATIVE,
     "(misses the deadline of 799 ms)", "TTFT budget"),
]


def test_the_exact_model_sits_on_round_numbers() -> None:
    d = decide(RouteRequest(100, 10, acceptance=0.5), EXACT_LINK, EXACT_COSTS)
    assert {r: (e.ttft_ms, e.total_ms) for r, e in d.estimates.items()} == EXACT


@pytest.mark.parametrize("override, deadline, ttft, route, present, absent", [r[1:] for r in LIMITS],
                         ids=[r[0] for r in LIMITS])
def test_an_estimate_exactly_on_a_limit_meets_it(
    override: str | None, deadline: int | None, ttft: int | None, route: str, present: str, absent: str
) -> None:
    r = RouteRequest(100, 10, override=override, deadline_ms=deadline, ttft_budget_ms=ttft, acceptance=0.5)
    d = decide(r, EXACT_LINK, EXACT_COSTS)
    assert d.route == route, d.reason
    assert present in d.reason and absent not in d.reason, d.reason
