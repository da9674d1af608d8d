"""The edge's speculative client against a real cloud verifier server, through the link shaper.

Real gRPC on 127.0.0.1, the tiny target in fp32 on the cloud side and the tiny ONNX drafter on
the edge side. The link is cut, black-holed and slowed in the middle of answers; every answer
must equal the undisturbed one, token for token. A black hole lasts far longer than the
deadline (or for good), and the wait it causes is measured on one clock against the deadline
plus the round time measured in the same run. A tampering proxy in the shaper's place rewrites
verdicts on the wire: the edge must commit nothing from them.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest

from cloud_node.verifier import VerifierCore
from edge_node.cloud_link import CloudLink, LinkDeadline, RequestCancelled, SessionRequest, cloud_generate
from edge_node.drafter import DrafterModel
from edge_node.generation import EdgeResult, generate_cloud, generate_speculative
from netshape.shaper import LinkShaper
from protos.tandem.v1 import cloud_pb2
from tandem.pair import LocalPair
from tandem_core.deadline import DeadlinePolicy, RoundDeadline
from tandem_core.loop import SwitchCause
from tandem_core.sampling import SamplingParams
from tests.support.cloud_server import serving
from tests.support.tamper_proxy import TamperProxy

log = logging.getLogger(__name__)

PROMPT = [5, 17, 99, 3, 44, 101, 7]
N = 40
DEADLINE_S = 0.6  # short: a doubled deadline (1.2 s) or a wait for the link fails the bound clearly
RESTORE_AFTER_S = 3.0  # a black hole ends this long after it began, far past any bound
SLACK_S = 0.2  # thread hand-offs and the first local token; 3 measured rounds are added to it
BACKOFF_S = 0.05  # before a resume: backoff_delay(0, BACKOFF_S)


@pytest.fixture(scope="module")
def cloud(tiny_models) -> Iterator[str]:
    with serving(VerifierCore.load(tiny_models.target_hf, dtype="fp32")) as address:
        yield address


@pytest.fixture(scope="module")
def drafter(tiny_models) -> DrafterModel:
    return DrafterModel(tiny_models.drafter_onnx)


@pytest.fixture(scope="module")
def reference(tiny_models) -> tuple[int, ...]:
    pair = LocalPair(tiny_models.target_hf, None, dtype="fp32")
    return pair.target_generate(PROMPT, SamplingParams(), max_new_tokens=N).tokens


@pytest.fixture()
def shaper(cloud: str) -> Iterator[LinkShaper]:
    with LinkShaper(cloud) as s:
        yield s


GREEDY = SamplingParams()


@dataclass
class Timeline:
    """Tokens as the caller got them, when, and when the fault struck: one monotonic clock."""

    tokens: list[int] = field(default_factory=list)
    arrivals: list[tuple[float, str]] = field(default_factory=list)  # (time, source) per batch
    fault_at: float = 0.0  # 0: not yet

    def mark(self, tokens: Sequence[int], source: str) -> None:
        self.tokens.extend(tokens)
        self.arrivals.append((time.monotonic(), source))

    def strike(self, fault: Callable[[], object]) -> None:
        fault()
        self.fault_at = time.monotonic()

    def fault_after(self, n: int, fault: Callable[[], object]) -> Callable[[Sequence[int], str], None]:
        """An `on_tokens` that marks every batch and strikes `fault` once `n` tokens have come."""
        def on_tokens(tokens: Sequence[int], source: str) -> None:
            self.mark(tokens, source)
            if not self.fault_at and len(self.tokens) >= n:
                self.strike(fault)
        return on_tokens

    def round_s(self) -> float:
        """The longest gap between batches before the fault (the first, with the prefill, excluded)."""
        before = [t for t, _ in self.arrivals if t <= self.fault_at]
        return max((b - a for a, b in zip(before, before[1:])), default=0.0)

    def first_local(self) -> float:
        return next(t for t, source in self.arrivals if source == "local")

    def first_after(self, moment: float) -> float:
        return next(t for t, _ in self.arrivals if t > moment)

    def check_stall(self, end: float, deadline_s: float, extra_s: float = 0.0) -> None:
        """The wait that ended at `end` began at the fault, or at a reply already past the shaper
        when it struck; it lasted at least the deadline and at most the deadline plus `extra_s`,
        three rounds of this run and SLACK_S."""
        assert self.fault_at, "the fault never struck"
        start = max([self.fault_at] + [t for t, _ in self.arrivals if t < end])
        bound = deadline_s + extra_s + 3 * self.round_s() + SLACK_S
        measured = (f"fault -> {end - self.fault_at:.3f} s, stall {end - start:.3f} s, deadline {deadline_s} s, "
                    f"round {self.round_s():.3f} s, bound {bound:.3f} s")
        log.info("stall: %s", measured)  # the figures the bound was checked against
        assert deadline_s <= end - start <= bound, measured


class CallTimes(grpc.UnaryStreamClientInterceptor, grpc.StreamStreamClientInterceptor):
    """When each call started, by method name ("Verify", "Generate")."""

    def __init__(self) -> None:
        self.started: dict[str, list[float]] = defaultdict(list)

    def _mark(self, details: grpc.ClientCallDetails) -> None:
        self.started[details.method.rsplit("/", 1)[-1]].append(time.monotonic())

    def intercept_unary_stream(self, continuation, client_call_details, request):
        self._mark(client_call_details)
        return continuation(client_call_details, request)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        self._mark(client_call_details)
        return continuation(client_call_details, request_iterator)


def _restore_later(shaper: LinkShaper) -> None:
    timer = threading.Timer(RESTORE_AFTER_S, lambda: shaper.set_conditions(mode="up"))
    timer.daemon = True
    timer.start()


def _check_fallback(drafter: DrafterModel, result: EdgeResult, timeline: Timeline, reference: tuple[int, ...]) -> None:
    """Verified tokens are the target's; the rest is the drafter's own continuation of them."""
    m = result.verified_tokens
    assert timeline.tokens == result.tokens  # every token delivered once, in order
    assert [(s.at_token, s.to_route) for s in result.switches] == [(m, "local")]
    assert 5 <= m < N and tuple(result.tokens[:m]) == reference[:m]
    fresh = drafter.new_session([*PROMPT, *result.tokens[:m]], GREEDY, 0)
    assert result.tokens[m:] == list(fresh.generate(max_new_tokens=N - m, eos_ids=drafter.eos_ids))


def _run(drafter: DrafterModel, address: str, params: SamplingParams = GREEDY, *, seed: int = 0,
         on_tokens=None, round_timeout_s: float = 5.0, intercept: CallTimes | None = None) -> EdgeResult:
    with grpc.insecure_channel(address) as plain:
        channel = plain if intercept is None else grpc.intercept_channel(plain, intercept)
        link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, tuple(PROMPT), params, seed, N),
                         round_timeout_s=round_timeout_s)
        return generate_speculative(drafter, link, PROMPT, params, seed, draft_len=4, max_new_tokens=N,
                                    on_tokens=on_tokens, max_resumes=5, backoff_s=0.05)


def _address(shaper: LinkShaper) -> str:
    host, port = shaper.address
    return f"{host}:{port}"


def test_greedy_over_the_link_equals_the_target(drafter, shaper, reference) -> None:
    result = _run(drafter, _address(shaper))
    assert tuple(result.tokens) == reference
    assert result.resumes == 0
    assert 0 < result.stats.accepted <= result.stats.drafted
    # Greedy rounds carry only token ids: a few dozen bytes each way.
    assert result.bytes_up / result.stats.rounds < 100 and result.bytes_down / result.stats.rounds < 100


def test_a_cut_link_mid_answer_resumes_with_identical_output(drafter, shaper, reference) -> None:
    seen: list[int] = []

    def cut_once(tokens, _source) -> None:
        seen.extend(tokens)
        if len(seen) >= 10 and shaper.stats().connections_dropped == 0:
            shaper.drop_connections()

    result = _run(drafter, _address(shaper), on_tokens=cut_once)
    assert tuple(result.tokens) == reference
    assert seen == list(reference)  # every token delivered once, in order
    assert result.resumes >= 1


# --- black holes: the wait ends on the deadline, measured ------------------------------------
# The link stays black-holed far longer than any bound (or for good), so only the deadline can end
# the wait: a doubled deadline, or a wait for the link to come back, fails the bound.


def test_a_black_holed_link_mid_answer_resumes_after_the_round_deadline(drafter, shaper, reference) -> None:
    calls = CallTimes()
    timeline = Timeline()

    def blackhole_until_restored() -> None:
        shaper.set_conditions(mode="blackhole")
        _restore_later(shaper)

    result = _run(drafter, _address(shaper), on_tokens=timeline.fault_after(8, blackhole_until_restored),
                  round_timeout_s=DEADLINE_S, intercept=calls)
    assert tuple(result.tokens) == reference
    assert timeline.tokens == list(reference)  # every token delivered once, in order
    # The first resume (a new Verify call) came on the round deadline, long before the link returned.
    resumed = [t for t in calls.started["Verify"] if t > timeline.fault_at]
    assert resumed and result.resumes >= 1
    timeline.check_stall(resumed[0], DEADLINE_S, extra_s=BACKOFF_S)
    # Nothing got through before the link came back: the black hole really held.
    assert timeline.first_after(resumed[0]) - timeline.fault_at >= RESTORE_AFTER_S


def test_a_black_holed_link_mid_answer_falls_back_at_the_round_deadline(drafter, shaper, reference) -> None:
    timeline = Timeline()
    blackhole_once = timeline.fault_after(8, lambda: shaper.set_conditions(mode="blackhole"))  # for good
    with grpc.insecure_channel(_address(shaper)) as channel:
        link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, tuple(PROMPT), GREEDY, 0, N),
                         round_timeout_s=DEADLINE_S)
        result = generate_speculative(drafter, link, PROMPT, GREEDY, 0, draft_len=4, max_new_tokens=N,
                                      on_tokens=blackhole_once, fallback_local=True)
    [switch] = result.switches
    assert switch.cause == SwitchCause.LATE_VERDICT
    timeline.check_stall(timeline.first_local(), DEADLINE_S)
    _check_fallback(drafter, result, timeline, reference)


def test_cloud_only_black_hole_falls_back_at_the_gap_deadline(drafter, shaper, reference) -> None:
    timeline = Timeline()
    blackhole_once = timeline.fault_after(5, lambda: shaper.set_conditions(mode="blackhole"))  # for good
    with grpc.insecure_channel(_address(shaper)) as channel:
        result = generate_cloud(drafter, channel, PROMPT, GREEDY, 0, max_new_tokens=N, on_tokens=blackhole_once,
                                first_timeout_s=30.0, gap_timeout_s=DEADLINE_S, fallback_local=True)
    [switch] = result.switches
    assert switch.cause == SwitchCause.LATE_VERDICT
    timeline.check_stall(timeline.first_local(), DEADLINE_S)
    _check_fallback(drafter, result, timeline, reference)


# --- a link black-holed before the open: link checks end the open's wait ---------------------
OPEN_S = 30.0  # the open deadline (the cloud's prefill is in it): long, as in production (60 s)
OPEN_BOUND_S = DEADLINE_S + 1.0  # the check limit (the round deadline, nothing learnt yet), checks 0.1 s apart, slack


def _adaptive() -> LinkDeadline:
    return LinkDeadline(RoundDeadline(DeadlinePolicy()))


def test_a_link_black_holed_at_the_open_falls_back_within_the_round_deadline(drafter, shaper, reference) -> None:
    shaper.set_conditions(mode="blackhole")
    timeline = Timeline()
    t0 = time.monotonic()
    with grpc.insecure_channel(_address(shaper)) as channel:
        link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, tuple(PROMPT), GREEDY, 0, N),
                         round_timeout_s=DEADLINE_S, open_timeout_s=OPEN_S, deadline=_adaptive())
        result = generate_speculative(drafter, link, PROMPT, GREEDY, 0, draft_len=4, max_new_tokens=N,
                                      on_tokens=timeline.mark, fallback_local=True)
    waited = timeline.first_local() - t0
    [switch] = result.switches
    assert (switch.at_token, switch.cause) == (0, SwitchCause.LATE_VERDICT) and "link check" in switch.reason
    assert waited < OPEN_BOUND_S, f"the first token came {waited:.2f} s in"
    fresh = drafter.new_session(PROMPT, GREEDY, 0)
    assert result.tokens == list(fresh.generate(max_new_tokens=N, eos_ids=drafter.eos_ids))


def test_cloud_only_black_holed_at_the_open_falls_back_within_the_gap_deadline(drafter, shaper) -> None:
    shaper.set_conditions(mode="blackhole")
    timeline = Timeline()
    t0 = time.monotonic()
    with grpc.insecure_channel(_address(shaper)) as channel:
        result = generate_cloud(drafter, channel, PROMPT, GREEDY, 0, max_new_tokens=N, on_tokens=timeline.mark,
                                first_timeout_s=OPEN_S, gap_timeout_s=DEADLINE_S, fallback_local=True)
    [switch] = result.switches
    assert (switch.at_token, switch.cause) == (0, SwitchCause.LATE_VERDICT) and "link check" in switch.reason
    assert timeline.first_local() - t0 < OPEN_BOUND_S


def test_a_slow_open_on_a_live_link_is_waited_for(tiny_models, drafter, reference) -> None:
    """The cloud takes 2.5 s to open (a long prefill) on a healthy link: the checks are answered,
    so neither route gives up before the open deadline, and the answers are the target's. The
    speculative link learns from those answered checks (with pipelined rounds, few others are)."""
    core = VerifierCore.load(tiny_models.target_hf, dtype="fp32")
    original = core.open

    def slow_open(spec, cancelled=None):  # type: ignore[no-untyped-def]
        time.sleep(2.5)
        return original(spec, cancelled)

    core.open = slow_open  # type: ignore[method-assign]
    with serving(core) as address, LinkShaper(address) as slow_shaper, \
            grpc.insecure_channel(_address(slow_shaper)) as channel:
        deadline = _adaptive()
        assert deadline.check_timeout_s(None) is None
        link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, tuple(PROMPT), GREEDY, 0, N),
                         round_timeout_s=DEADLINE_S, open_timeout_s=OPEN_S, deadline=deadline)
        speculative = generate_speculative(drafter, link, PROMPT, GREEDY, 0, draft_len=4, max_new_tokens=N,
                                           fallback_local=True)
        assert deadline.check_timeout_s(None) is not None, "the open's answered checks were learnt"
        cloud = generate_cloud(drafter, channel, PROMPT, GREEDY, 0, max_new_tokens=N, first_timeout_s=OPEN_S,
                               gap_timeout_s=DEADLINE_S, fallback_local=True)
    for result in (speculative, cloud):
        assert not result.switches and tuple(result.tokens) == reference


def test_a_request_cancelled_while_the_open_waits_ends_at_once(drafter, shaper) -> None:
    shaper.set_conditions(mode="blackhole")
    t0 = time.monotonic()

    def cancelled() -> bool:
        return time.monotonic() - t0 > 0.2

    with grpc.insecure_channel(_address(shaper)) as channel:
        link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, tuple(PROMPT), GREEDY, 0, N),
                         round_timeout_s=5.0, open_timeout_s=OPEN_S, deadline=_adaptive())
        with pytest.raises(RequestCancelled):
            generate_speculative(drafter, link, PROMPT, GREEDY, 0, draft_len=4, max_new_tokens=N,
                                 fallback_local=True, cancelled=cancelled)
        assert time.monotonic() - t0 < 1.5
        t0 = time.monotonic()
        with pytest.raises(RequestCancelled):
            generate_cloud(drafter, channel, PROMPT, GREEDY, 0, max_new_tokens=N, first_timeout_s=OPEN_S,
                           gap_timeout_s=5.0, fallback_local=True, cancelled=cancelled)
        assert time.monotonic() - t0 < 1.5


def test_cloud_only_black_hole_resumes_after_the_gap_deadline(shaper, reference) -> None:
    calls = CallTimes()
    timeline = Timeline()
    with grpc.insecure_channel(_address(shaper)) as plain:
        channel = grpc.intercept_channel(plain, calls)
        for response in cloud_generate(channel, PROMPT, GREEDY, 0, N, gap_timeout_s=DEADLINE_S, backoff_s=BACKOFF_S):
            timeline.mark(response.tokens, "cloud")
            if not timeline.fault_at and len(timeline.tokens) >= 5:
                timeline.strike(lambda: shaper.set_conditions(mode="blackhole"))
                _restore_later(shaper)
    assert timeline.tokens == list(reference)  # every token once, in order, across the resumes
    resumed = [t for t in calls.started["Generate"] if t > timeline.fault_at]
    assert resumed, "no new Generate call after the black hole"
    timeline.check_stall(resumed[0], DEADLINE_S, extra_s=BACKOFF_S)
    assert timeline.first_after(resumed[0]) - timeline.fault_at >= RESTORE_AFTER_S


def test_sampling_with_a_seed_survives_a_cut_identically(drafter, shaper) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95)
    undisturbed = _run(drafter, _address(shaper), params, seed=7)
    cut = {"done": False}

    def cut_once(tokens, _source) -> None:
        if not cut["done"]:
            cut["done"] = True
            shaper.drop_connections()

    disturbed = _run(drafter, _address(shaper), params, seed=7, on_tokens=cut_once)
    assert disturbed.tokens == undisturbed.tokens
    assert disturbed.resumes >= 1
    other = _run(drafter, _address(shaper), params, seed=8)
    assert other.tokens != undisturbed.tokens


def test_latency_slows_rounds_but_not_the_answer(drafter, shaper, reference) -> None:
    shaper.set_conditions(rtt_ms=80)
    result = _run(drafter, _address(shaper))
    assert tuple(result.tokens) == reference
    assert result.wall_s >= 0.08 * result.stats.rounds * 0.9


def test_cloud_only_stream_resumes_after_a_cut(shaper, reference) -> None:
    got: list[int] = []
    with grpc.insecure_channel(_address(shaper)) as channel:
        for response in cloud_generate(channel, PROMPT, SamplingParams(), 0, N, backoff_s=0.05):
            got.extend(response.tokens)
            if len(got) >= 5 and shaper.stats().connections_dropped == 0:
                shaper.drop_connections()
    assert tuple(got) == reference


# --- tampered verdicts ------------------------------------------------------------------------
# Each change edits a wire verdict in place and says whether it applied. None of them touches
# the target's own last token alone: no check can see that one, only an authenticated channel.


def _change_an_accepted_draft(v: cloud_pb2.Verdict) -> bool:
    if v.accepted < 1:
        return False
    v.tokens[0] = v.tokens[0] ^ 1
    return True


def _accept_one_more(v: cloud_pb2.Verdict) -> bool:
    if v.finished:
        return False
    v.accepted += 1
    return True


def _add_a_token(v: cloud_pb2.Verdict) -> bool:
    v.tokens.append(v.tokens[-1] if v.tokens else 0)  # a dropped round's verdict has none
    return True


def _echo_another_round(v: cloud_pb2.Verdict) -> bool:
    v.round += 1
    return True


def _finish_without_a_reason(v: cloud_pb2.Verdict) -> bool:
    if v.finished:
        return False
    v.finished = True
    return True


class _Tamper:
    """The proxy's rewrite: `change` on verdicts from the `first`-th on, `times` of them at most."""

    def __init__(self, change: Callable[[cloud_pb2.Verdict], bool], *, first: int, times: int = 1) -> None:
        self.change, self.first, self.times = change, first, times
        self.verdicts = self.changed = 0

    def __call__(self, message: bytes) -> bytes:
        response = cloud_pb2.VerifyResponse.FromString(message)
        if response.WhichOneof("kind") != "verdict":
            return message
        self.verdicts += 1
        if self.verdicts < self.first or self.changed >= self.times or not self.change(response.verdict):
            return message
        self.changed += 1
        return response.SerializeToString()


TAMPERINGS = {  # what the edge logs when it drops the verdict
    "changed_accepted_draft": (_change_an_accepted_draft, ("bad verdict: prefix",)),
    "one_more_accepted": (_accept_one_more, ("bad verdict: prefix", "bad verdict: accepted")),
    "extra_token": (_add_a_token, ("bad verdict: count",)),
    "wrong_round": (_echo_another_round, ("out-of-order reply",)),
    "finished_without_reason": (_finish_without_a_reason, ("bad verdict: finish",)),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_tampered_verdicts_are_dropped_and_the_answer_equals_the_target(drafter, cloud, reference, caplog,
                                                                        tampering: str) -> None:
    change, logged = TAMPERINGS[tampering]
    tamper, seen = _Tamper(change, first=2), []
    with TamperProxy(cloud, tamper) as proxy, caplog.at_level(logging.WARNING, logger="edge_node.cloud_link"):
        result = _run(drafter, proxy.address, on_tokens=lambda tokens, _source: seen.extend(tokens))
    assert tamper.changed == 1
    assert tuple(result.tokens) == reference
    assert seen == list(reference)  # nothing from the tampered verdict reached the caller
    assert result.resumes == 1 and not result.switches
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(text in w for w in warnings for text in logged), warnings


def test_verdicts_tampered_again_and_again_fall_back_to_the_device(drafter, cloud, reference) -> None:
    tamper = _Tamper(_add_a_token, first=3, times=N)
    with TamperProxy(cloud, tamper) as proxy, grpc.insecure_channel(proxy.address) as channel:
        link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, tuple(PROMPT), GREEDY, 0, N))
        result = generate_speculative(drafter, link, PROMPT, GREEDY, 0, draft_len=4, max_new_tokens=N,
                                      fallback_local=True)
    m = result.verified_tokens
    # Two bad verdicts resumed, the third gives up. (The proxy may change more: a verdict of a round
    # sent ahead can still be on its way when the edge drops the stream.)
    assert tamper.changed >= 3 and result.resumes == 2
    assert [(s.cause, s.at_token) for s in result.switches] == [(SwitchCause.BAD_VERDICT, m)]
    assert m > 0 and tuple(result.tokens[:m]) == reference[:m]
    # The drafter's cache held exactly the committed tokens: it goes on as a fresh session would.
    fresh = drafter.new_session([*PROMPT, *result.tokens[:m]], GREEDY, 0)
    assert result.tokens[m:] == list(fresh.generate(max_new_tokens=N - m, eos_ids=drafter.eos_ids))


def test_rounds_later_than_the_deadline_are_reported_as_late_not_unreachable(drafter, shaper) -> None:
    """Without fallback_local, a caller whose rounds all miss a 1 ms deadline (RTT 50 ms here)
    is told the cloud did not answer in time, not that it is unreachable: it is healthy."""
    from edge_node.config import EdgeConfig
    from edge_node.servicer import create_server
    from protos.tandem.v1 import edge_pb2, edge_pb2_grpc

    shaper.set_conditions(rtt_ms=50)
    server, port = create_server(drafter, EdgeConfig(cloud_address=_address(shaper)), "127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as info:
            list(edge_pb2_grpc.EdgeNodeStub(channel).Generate(edge_pb2.EdgeGenerateRequest(
                prompt_tokens=PROMPT, max_new_tokens=4, mode=edge_pb2.EDGE_MODE_SPECULATIVE, round_deadline_ms=1),
                timeout=60))
    finally:
        server.stop(None)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details().startswith("the cloud verifier did not answer within the round deadline")
