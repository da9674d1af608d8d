"""The orchestrator's routing policy: which route serves a request, and why, in words.

Routes: "local" (the drafter q alone on the device: private, lower quality), "speculative" (the
device drafts with q, the cloud target p verifies: p's quality, lossless; Leviathan et al. 2023,
arXiv 2211.17192) and "cloud" (p generates alone in the cloud).

`decide(request, link, costs)` applies these rules, in order:
1. Privacy first. A conversation that already holds an answer drawn from private documents
   (`private_history`) -> local, whatever the privacy mode and the override say: history
   cannot be withheld the way retrieved chunks can. Private context under "strict" privacy ->
   local, whatever the override says.
   Private context under "cloud_quality" -> go on, and if the route chosen uses the cloud,
   `drop_private` is True (the caller withholds the private chunks) and the reason says so.
2. A client override is honoured when possible. An override that needs the cloud while the link
   is unusable (not configured, circuit open or half_open) -> local, and the reason says so.
   half_open counts as unusable: the health prober, not user requests, tests a recovering link.
3. Link unusable -> local.
4. Otherwise estimate every route (below), then: prefer target quality (speculative or cloud)
   whenever one of them meets the deadline and the TTFT budget, choosing the one that finishes
   sooner (speculative on a tie: same text, less cloud work); if neither does but local does ->
   local; if no route does -> the fastest finisher, with a reason saying the budget cannot be met.
   A route meets the limits when finish <= deadline_ms and TTFT <= ttft_budget_ms: an estimate
   exactly on a limit meets it.

Speed model (all times ms, rates tokens/s, RTT from the link view or `costs.rtt_prior_ms`):
- local:       TTFT = device prefill; rate = device decode.
- cloud:       TTFT = cloud prefill + RTT; rate = cloud decode (streaming hides the RTT).
- speculative: round = k / device decode + verify + RTT;
               TTFT = max(device prefill, cloud prefill + RTT) + round;
               rate = E / round with E = a*k + 1 the expected tokens per round for the measured
               fraction of drafts accepted a (accepted / drafted; `costs.acceptance_prior` if unknown).
- finish = TTFT + max_new_tokens / rate. Jitter is reported by the link view, not modelled.
- Estimates saturate instead of overflowing: a rate is kept within the positive finite floats
  and a time at `ESTIMATE_CAP_MS` (1e18 ms, past any limit a request can set, so a saturated route
  never meets one). Valid inputs, however extreme (a rate of 5e-324 tokens/s, a verify time of
  1e308 ms), therefore give finite estimates and never divide by zero.
So long prompts lean to cloud (the device prefills slower), high acceptance with short prompts
leans to speculative, and a high RTT with low acceptance leans to cloud.

Guarantees: pure (no I/O, no clock); the same inputs give the same decision; `reason` is a
non-empty sentence starting with the route; `estimates` holds every route the policy weighed
(local always; all three whenever rule 4 or a honoured cloud override runs); bad inputs raise
`InvalidField` (a ValueError) naming the field, and `decide` raises nothing else. Numbers must be
finite (NaN and infinities are refused) and counts are ints in [low, `MAX_COUNT` = 2**53].
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from enum import StrEnum

from tandem_core.link_health import (  # noqa: F401 (category constants re-exported)
    CATEGORIES,
    CATEGORY_CHAT,
    CATEGORY_CODE,
    CATEGORY_PROSE,
    CIRCUIT_CLOSED,
    CIRCUIT_STATES,
    show_value,
)

MAX_COUNT = 2**53  # the largest int input (token counts, draft length, limits in ms): exact as a float
ESTIMATE_CAP_MS = 1e18  # estimates saturate here: finite, and past every limit <= MAX_COUNT ms


class Route(StrEnum):
    """How an answer is generated."""

    LOCAL = "local"              # the drafter alone, on the device
    SPECULATIVE = "speculative"  # the device drafts, the cloud verifies
    CLOUD = "cloud"              # the cloud's target alone


class PrivacyMode(StrEnum):
    """What a request allows to happen to private personal context."""

    STRICT = "strict"                # private chunks retrieved -> the request stays on the device
    CLOUD_QUALITY = "cloud_quality"  # private chunks are dropped so the request may use the cloud


ROUTE_LOCAL, ROUTE_SPECULATIVE, ROUTE_CLOUD = Route.LOCAL, Route.SPECULATIVE, Route.CLOUD
ROUTES = tuple(Route)
CLOUD_ROUTES = (Route.SPECULATIVE, Route.CLOUD)  # the routes that use the link (target quality)

PRIVACY_STRICT, PRIVACY_CLOUD_QUALITY = PrivacyMode.STRICT, PrivacyMode.CLOUD_QUALITY
PRIVACY_MODES = tuple(PrivacyMode)


class InvalidField(ValueError):
    """A routing input is out of range; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _number(field: str, value: object, low: float, *, above: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidField(field, f"must be a number, got {show_value(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int past the float range
        number = math.inf
    if not math.isfinite(number) or number < low or (above and number == low):
        sign = ">" if above else ">="
        raise InvalidField(field, f"must be a finite number {sign} {low}, got {show_value(value)}")
    return number


def _optional_number(field: str, value: object, low: float, *, above: bool = False) -> None:
    if value is not None:
        _number(field, value, low, above=above)


def _fraction(field: str, value: object) -> None:
    if _number(field, value, 0.0) > 1:
        raise InvalidField(field, f"must be in [0, 1], got {show_value(value)}")


def _integer(field: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_COUNT:
        raise InvalidField(field, f"must be an int in [{low}, 2**53], got {show_value(value)}")


def _choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidField(field, f"must be one of {', '.join(allowed)}; got {show_value(value)}")


@dataclass(frozen=True)
class LinkView:
    """What the orchestrator knows about the cloud link right now."""

    circuit: str  # "closed", "open" or "half_open" (link_health.CircuitBreaker.state)
    rtt_ms: float | None  # smoothed RTT, ms; None before the first probe
    jitter_ms: float | None  # RTT mean deviation, ms; None before the first probe
    configured: bool  # False when no cloud address is set

    def __post_init__(self) -> None:
        _choice("circuit", self.circuit, CIRCUIT_STATES)
        _optional_number("rtt_ms", self.rtt_ms, 0.0)
        _optional_number("jitter_ms", self.jitter_ms, 0.0)
        if not isinstance(self.configured, bool):
            raise InvalidField("configured", f"must be a bool, got {show_value(self.configured)}")


@dataclass(frozen=True)
class RouteCosts:
    """The speed model. The defaults are this project's measured pair (BENCHMARKS.md, gRPC table:
    Qwen2.5-Coder 0.5B int4 ONNX drafter on a 2-core AVX2 CPU, 1.5B bf16 target on the same kind
    of CPU behind Ray Serve, ~50-token prompts). A GPU cloud decodes and prefills far faster; the
    orchestrator replaces these values with measured statistics as they come in."""

    device_prefill_tps: float = 60.0  # drafter prompt processing on the device, tokens/s
    device_decode_tps: float = 30.0  # drafter generation on the device, tokens/s
    cloud_prefill_tps: float = 25.0  # target prompt processing in the cloud, tokens/s
    cloud_decode_tps: float = 3.7  # target generating alone in the cloud (streamed), tokens/s
    verify_ms: float = 370.0  # cloud time to score one round of k drafts, ms (RTT excluded)
    draft_len: int = 4  # k, drafts per speculative round
    acceptance_prior: float = 0.6  # per-draft acceptance assumed when none is measured, [0, 1]
    rtt_prior_ms: float = 50.0  # RTT assumed before the first probe answers, ms

    def __post_init__(self) -> None:
        rates = ("device_prefill_tps", "device_decode_tps", "cloud_prefill_tps", "cloud_decode_tps")
        for field in rates:
            _number(field, getattr(self, field), 0.0, above=True)
        _number("verify_ms", self.verify_ms, 0.0)
        _integer("draft_len", self.draft_len, 1)
        _fraction("acceptance_prior", self.acceptance_prior)
        _number("rtt_prior_ms", self.rtt_prior_ms, 0.0)


@dataclass(frozen=True)
class RouteRequest:
    """One request as the policy sees it."""

    prompt_tokens: int  # prompt length after templating and context injection, tokens
    max_new_tokens: int  # generation budget, tokens (>= 1)
    override: str | None = None  # "local", "speculative", "cloud", or None to let the policy pick
    deadline_ms: int | None = None  # the whole answer must be done within this, ms; None = none
    ttft_budget_ms: int | None = None  # the first token must come within this, ms; None = none
    private_context: bool = False  # the prompt would carry private personal chunks
    private_history: bool = False  # an earlier message holds an answer drawn from private documents
    privacy_mode: str = PRIVACY_STRICT  # "strict" or "cloud_quality"
    acceptance: float | None = None  # measured acceptance for this category/session, [0, 1]
    category: str | None = None  # "code", "chat", "prose" (only quoted in the reason)

    def __post_init__(self) -> None:
        _integer("prompt_tokens", self.prompt_tokens, 0)
        _integer("max_new_tokens", self.max_new_tokens, 1)
        if self.override is not None:
            _choice("override", self.override, ROUTES)
        if self.deadline_ms is not None:
            _integer("deadline_ms", self.deadline_ms, 1)
        if self.ttft_budget_ms is not None:
            _integer("ttft_budget_ms", self.ttft_budget_ms, 1)
        for name in ("private_context", "private_history"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidField(name, f"must be a bool, got {show_value(getattr(self, name))}")
        _choice("privacy_mode", self.privacy_mode, PRIVACY_MODES)
        if self.acceptance is not None:
            _fraction("acceptance", self.acceptance)
        if self.category is not None and (not isinstance(self.category, str) or not self.category):
            raise InvalidField("category", "must be a non-empty string or None")


@dataclass(frozen=True)
class RouteEstimate:
    """The speed model's prediction for one route."""

    ttft_ms: float  # time to the first token, ms
    tokens_per_s: float  # steady generation rate, tokens/s
    total_ms: float  # ttft_ms + max_new_tokens / tokens_per_s, ms


@dataclass(frozen=True)
class RouteDecision:
    route: str  # "local", "speculative" or "cloud"
    reason: str  # one human-readable sentence, starting with the route
    drop_private: bool  # the caller must withhold private chunks (cloud route, cloud_quality)
    estimates: dict[Route, RouteEstimate]  # route -> prediction, for every route weighed

    def to_dict(self) -> dict[str, object]:
        """Plain JSON types only."""
        return {
            "route": self.route,
            "reason": self.reason,
            "drop_private": self.drop_private,
            "estimates": {r: asdict(e) for r, e in self.estimates.items()},
        }


def expected_tokens_per_round(acceptance: float, draft_len: int) -> float:
    """E = a*k + 1: accepted drafts plus the target's correction or bonus token, per round.

    `acceptance` is the measured fraction of drafts accepted (accepted / drafted, what
    GenerationStats reports), so a*k is exactly the mean accepted per full round. (The textbook
    (1 - a^(k+1)) / (1 - a) takes a per-position acceptance probability instead; fed the measured
    fraction it undercounts: at 0.456 it gives 1.80 tokens/round where the pair measured 2.81.)
    """
    return acceptance * draft_len + 1.0


def _estimate(ttft_ms: float, rate: float, max_new_tokens: int) -> RouteEstimate:
    """One route's estimate, saturated (module docstring): finite, total >= TTFT >= 0, rate > 0.
    The inputs are never NaN: validated values only add, multiply and divide by positive numbers."""
    rate = min(max(rate, math.ulp(0.0)), sys.float_info.max)  # an underflow to 0 or overflow to inf
    ttft_ms = min(ttft_ms, ESTIMATE_CAP_MS)
    return RouteEstimate(ttft_ms, rate, min(ttft_ms + 1000.0 * max_new_tokens / rate, ESTIMATE_CAP_MS))


def estimate_routes(
    req: RouteRequest, rtt_ms: float, acceptance: float, costs: RouteCosts
) -> dict[Route, RouteEstimate]:
    """TTFT, rate and finish time of each route under the speed model (module docstring)."""
    device_prefill = 1000.0 * req.prompt_tokens / costs.device_prefill_tps
    cloud_prefill = 1000.0 * req.prompt_tokens / costs.cloud_prefill_tps
    round_ms = 1000.0 * costs.draft_len / costs.device_decode_tps + costs.verify_ms + rtt_ms
    spec_rate = 1000.0 * expected_tokens_per_round(acceptance, costs.draft_len) / round_ms
    spec_ttft = max(device_prefill, cloud_prefill + rtt_ms) + round_ms
    n = req.max_new_tokens
    return {
        ROUTE_LOCAL: _estimate(device_prefill, costs.device_decode_tps, n),
        ROUTE_SPECULATIVE: _estimate(spec_ttft, spec_rate, n),
        ROUTE_CLOUD: _estimate(cloud_prefill + rtt_ms, costs.cloud_decode_tps, n),
    }


def link_problem(link: LinkView) -> str | None:
    """Why the link cannot carry a request now, in words; None when it can."""
    if not link.configured:
        return "no cloud link is configured"
    if link.circuit != CIRCUIT_CLOSED:
        return f"the cloud link is down (circuit {link.circuit})"
    return None


def meets_budget(req: RouteRequest, est: RouteEstimate) -> bool:
    if req.deadline_ms is not None and est.total_ms > req.deadline_ms:
        return False
    return req.ttft_budget_ms is None or est.ttft_ms <= req.ttft_budget_ms


def decide(req: RouteRequest, link: LinkView, costs: RouteCosts) -> RouteDecision:
    """The route for `req`, why, and the estimates behind it (rules in the module docstring)."""
    local_only = {ROUTE_LOCAL: estimate_routes(req, 0.0, 0.0, costs)[ROUTE_LOCAL]}
    if req.private_history:
        why = "the conversation holds an answer drawn from private documents; it stays on the device"
        if req.override in CLOUD_ROUTES:
            why += f"; the requested {req.override} route would send it to the cloud"
        return RouteDecision(ROUTE_LOCAL, f"{ROUTE_LOCAL}: {why}", False, local_only)
    if req.private_context and req.privacy_mode == PRIVACY_STRICT:
        why = "private context stays on the device (strict privacy)"
        if req.override in CLOUD_ROUTES:
            why += f"; the requested {req.override} route would send it to the cloud"
        return _decision(req, ROUTE_LOCAL, why, local_only)
    if req.override == ROUTE_LOCAL:
        return _decision(req, ROUTE_LOCAL, "requested by the client", local_only)
    problem = link_problem(link)
    if problem is not None:
        why = problem if req.override is None else f"{req.override} was requested but {problem}"
        return _decision(req, ROUTE_LOCAL, why, local_only)
    rtt_ms = costs.rtt_prior_ms if link.rtt_ms is None else link.rtt_ms
    acceptance = costs.acceptance_prior if req.acceptance is None else req.acceptance
    estimates = estimate_routes(req, rtt_ms, acceptance, costs)
    context = f"link up ({_rtt_text(link, costs)}), {_acceptance_text(req, acceptance)}"
    if req.override is not None:
        est = estimates[Route(req.override)]
        why = f"requested by the client; {context}; est. {_speed(est)}"
        if not meets_budget(req, est):
            why += f" (misses the {_missed_text(req, est)})"
        return _decision(req, req.override, why, estimates)
    route, why = _choose(req, estimates, context)
    return _decision(req, route, why, estimates)


def _choose(req: RouteRequest, est: dict[Route, RouteEstimate], context: str) -> tuple[str, str]:
    """Rule 4 over the estimates of all three routes."""
    fitting = [r for r in CLOUD_ROUTES if meets_budget(req, est[r])]
    if fitting:
        # min keeps the first of equals: speculative wins a tie (same text, less cloud work).
        best = min(fitting, key=lambda r: est[r].total_ms)
        other = ROUTE_CLOUD if best == ROUTE_SPECULATIVE else ROUTE_SPECULATIVE
        misses = "" if other in fitting else f" (misses the {_missed_text(req, est[other])})"
        why = f"{context}; est. {_speed(est[best])} vs {other} {_speed(est[other])}{misses}"
        return best, why
    budget = _budget_text(req)
    others = " and ".join(f"{r} {_speed(est[r])}" for r in CLOUD_ROUTES)
    if meets_budget(req, est[ROUTE_LOCAL]):
        return ROUTE_LOCAL, (
            f"neither cloud route meets the {budget}; est. {_speed(est[ROUTE_LOCAL])} vs {others}"
        )
    best = min(ROUTES, key=lambda r: est[r].total_ms)
    rest = " and ".join(f"{r} {_speed(est[r])}" for r in ROUTES if r != best)
    why = f"the {budget} cannot be met by any route; fastest: est. {_speed(est[best])} vs {rest}"
    return best, why


def _decision(
    req: RouteRequest, route: str, why: str, estimates: dict[Route, RouteEstimate]
) -> RouteDecision:
    drop = (
        req.private_context and req.privacy_mode == PRIVACY_CLOUD_QUALITY and route != ROUTE_LOCAL
    )
    if drop:
        why += "; private context withheld so the cloud can be used (cloud_quality privacy)"
    return RouteDecision(route, f"{route}: {why}", drop, estimates)


def _speed(est: RouteEstimate) -> str:
    done_s = est.total_ms / 1000
    return f"{est.tokens_per_s:.1f} tok/s, TTFT {est.ttft_ms:.0f} ms, done in {done_s:.1f} s"


def _rtt_text(link: LinkView, costs: RouteCosts) -> str:
    if link.rtt_ms is None:
        return f"rtt not measured yet, assuming {costs.rtt_prior_ms:.0f} ms"
    jitter = "" if link.jitter_ms is None else f" +- {link.jitter_ms:.0f}"
    return f"rtt {link.rtt_ms:.0f}{jitter} ms"


def _acceptance_text(req: RouteRequest, acceptance: float) -> str:
    where = f" on {req.category}" if req.category else ""
    if req.acceptance is None:
        return f"acceptance{where} not measured yet, assuming {acceptance:.2f}"
    return f"acceptance {acceptance:.2f}{where}"


def _missed_text(req: RouteRequest, est: RouteEstimate) -> str:
    """Which of the request's limits `est` breaks, in words."""
    late = req.deadline_ms is not None and est.total_ms > req.deadline_ms
    slow = req.ttft_budget_ms is not None and est.ttft_ms > req.ttft_budget_ms
    return _limits_text(req.deadline_ms if late else None, req.ttft_budget_ms if slow else None)


def _budget_text(req: RouteRequest) -> str:
    return _limits_text(req.deadline_ms, req.ttft_budget_ms)


def _limits_text(deadline_ms: int | None, ttft_budget_ms: int | None) -> str:
    parts = []
    if deadline_ms is not None:
        parts.append(f"deadline of {deadline_ms} ms")
    if ttft_budget_ms is not None:
        parts.append(f"TTFT budget of {ttft_budget_ms} ms")
    return " and ".join(parts) or "budget"
