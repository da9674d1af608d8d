"""The learnt round deadline (issue 15, item 3) on the deployed edge path, through the link shaper.

`EdgeCore.run` (what the edge node's servicer calls) against a real cloud verifier server on
127.0.0.1: the tiny target in fp32 in the cloud, the tiny ONNX drafter on the edge, the edge's
default configuration unless a test says otherwise, and every answer with fallback on, so that
a misfired deadline shows as a route switch. One `EdgeCore` per test: what its answers learn is
shared across them, as on the node.

- A slow, jittery link (RTT 200 ms +- 50 ms each way) never misfires, while rounds wait the
  learnt deadline, well below the ceiling: every answer equals the target's, with no switch and
  no resume.
- A link that slows down between answers (learnt at RTT 0, then 500 ms, above the learnt
  deadline) does not misfire either: each stream's first round waits the ceiling, and its
  latency bounds the later ones.
- A black-holed link, once the deadline is learnt, falls back at the learnt deadline (300 ms
  here, the floor) or sooner when a link check goes unanswered (read from the switch's reason),
  far below the configured ceiling of 5 s, within that wait plus three rounds of the same run
  plus a slack (the stall measured on one clock, as in test_edge_cloud_faults.py).
- On a cloud whose pass takes 250 ms (slept in the cloud's round, which reports it, as the real
  pair's), a black hole is caught by the link check: the round is given up once the check goes
  unanswered, well before the learnt deadline, which a slow pass alone never reaches.
- A link that dies 250 ms into a 700 ms pass, after the round's first check was answered, is
  caught by the next check, within 100 ms of the fault, plus that check's timeout.
- While the drafter drafts the next 16 drafts ahead (each pass slowed to 50 ms, as the real
  drafter's on a loaded core), the checks still start 100 ms into the wait: the first local token
  comes within the check, its timeout and a few passes of the fault, not after the drafting.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest

from cloud_node import verifier
from cloud_node.verifier import VerifierCore
from edge_node.config import EdgeConfig
from edge_node.core import EdgeCore
from edge_node.drafter import DrafterModel, DrafterSession
from edge_node.generation import EdgeResult
from netshape.shaper import LinkShaper
from tandem.pair import LocalPair
from tandem_core.loop import SwitchCause
from tandem_core.routing import Route
from tandem_core.sampling import SamplingParams
from tests.integration.test_edge_cloud_faults import Timeline
from tests.support.cloud_server import serving

log = logging.getLogger(__name__)

PROMPT = [5, 17, 99, 3, 44, 101, 7]
N = 40
GREEDY = SamplingParams()
CEILING_MS = 5000  # the black-hole test's configured deadline: far above anything learnt at RTT 0
SLACK_S = 0.5  # thread hand-offs and the first local token on a loaded 2-core machine
_DEADLINE_LOG = re.compile(r"deadline (\d+) ms, check after \d+ ms, ceiling (\d+) ms")
PASS_S = 0.25  # the slow cloud's pass
DRAFT_PASS_S = 0.05  # the slow drafter's pass
MID_ROUND_PASS_S = 0.7  # the pass the link dies in the middle of
MID_ROUND_FAULT_S = 0.25  # how far into it
MID_ROUND_N = 12  # tokens per answer while the deadline is learnt (each round takes a 0.7 s pass)


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
    return pair.target_generate(PROMPT, GREEDY, max_new_tokens=N).tokens


@pytest.fixture()
def shaper(cloud: str) -> Iterator[LinkShaper]:
    with LinkShaper(cloud, seed=15) as s:
        yield s


@pytest.fixture()
def channel(shaper: LinkShaper) -> Iterator[grpc.Channel]:
    host, port = shaper.address
    with grpc.insecure_channel(f"{host}:{port}") as c:
        yield c


def _core(drafter: DrafterModel, channel: grpc.Channel, shaper: LinkShaper, **config) -> EdgeCore:
    host, port = shaper.address
    return EdgeCore(drafter, EdgeConfig(cloud_address=f"{host}:{port}", **config), channel)


def _answer(core: EdgeCore, n: int = N, on_tokens=None, **job) -> EdgeResult:
    prepared = core.prepare(list(PROMPT), GREEDY, route=Route.SPECULATIVE, max_new_tokens=n, fallback_local=True,
                            **job)
    return core.run(prepared, on_tokens or (lambda tokens, source: None))


def _check_clean(result: EdgeResult, reference: tuple[int, ...], n: int = N) -> None:
    assert not result.switches, f"misfired: {[s.reason for s in result.switches]}"
    assert result.resumes == 0
    assert tuple(result.tokens) == reference[:n]


def _learn(core: EdgeCore, reference: tuple[int, ...], ceiling_s: float) -> float:
    """Answer over the healthy link until the deadline is learnt (at most 5 answers); returns it
    for a round of 4 drafts."""
    for _ in range(5):
        _check_clean(_answer(core), reference)
        learnt = core.deadline.deadline_s(5, ceiling_s)
        if learnt < ceiling_s:
            return learnt
    pytest.fail("5 answers and the deadline is still the ceiling")


def test_a_slow_jittery_link_never_misfires(drafter, channel, shaper, reference, caplog) -> None:
    ceiling_ms = 2000  # a learnt deadline (about 0.8 to 1 s here) must show below it
    shaper.set_conditions(rtt_ms=200, jitter_ms=50)
    core = _core(drafter, channel, shaper)
    with caplog.at_level(logging.DEBUG, logger="edge_node.cloud_link"):
        for _ in range(6):
            _check_clean(_answer(core, round_deadline_ms=ceiling_ms), reference)
    waited = [(int(m[1]), int(m[2])) for r in caplog.records if (m := _DEADLINE_LOG.search(r.getMessage()))]
    learnt = [d for d, ceiling in waited if d < ceiling]
    log.info("%d rounds waited a learnt deadline (%s ms), %d the ceiling", len(learnt),
             f"{min(learnt)} to {max(learnt)}" if learnt else "none", len(waited) - len(learnt))
    assert len(learnt) >= 20, "the deadline never adapted: the test would not test it"
    # Below the ceiling; 2 x the shortest possible round trip (2 x 50 ms) + 50 ms is below the floor.
    assert max(learnt) < ceiling_ms and min(learnt) >= 300


def test_a_link_that_slows_down_between_answers_does_not_misfire(drafter, channel, shaper, reference) -> None:
    core = _core(drafter, channel, shaper)
    learnt = _learn(core, reference, 1.0)
    assert learnt == 0.3  # the floor: a tiny model's rounds at RTT 0 take a few ms
    shaper.set_conditions(rtt_ms=500)  # every round now takes longer than the learnt deadline
    # A 2 s ceiling: a loaded machine's delays stay far from it; without `fastest` the rounds after
    # the first would wait the learnt 0.3 s and misfire.
    _check_clean(_answer(core, n=24, round_deadline_ms=2000), reference, n=24)


def test_a_black_holed_link_falls_back_at_the_learnt_deadline_or_sooner(drafter, channel, shaper, reference) -> None:
    core = _core(drafter, channel, shaper, round_deadline_ms=CEILING_MS)
    learnt = _learn(core, reference, CEILING_MS / 1000)
    timeline = Timeline()
    result = _answer(core, on_tokens=timeline.fault_after(12, lambda: shaper.set_conditions(mode="blackhole")))
    [switch] = result.switches
    assert switch.cause == SwitchCause.LATE_VERDICT, switch.reason
    assert "learnt deadline" in switch.reason or "no answer to a link check" in switch.reason, switch.reason
    waited_s = int(re.search(r"no reply within (\d+) ms", switch.reason)[1]) / 1000
    assert learnt == 0.3  # the floor: a tiny model's rounds at RTT 0 take a few ms
    assert 0.1 <= waited_s <= learnt, switch.reason  # a check (not before 100 ms), or the deadline
    _check_stall(timeline, result, reference, waited_s, "")


def test_a_black_hole_on_a_slow_cloud_is_caught_by_the_link_check(drafter, channel, shaper, reference,
                                                                  monkeypatch) -> None:
    real_round = verifier.target_round

    def slow_round(*args, **kwargs):
        time.sleep(PASS_S)
        return real_round(*args, **kwargs)

    monkeypatch.setattr(verifier, "target_round", slow_round)
    core = _core(drafter, channel, shaper, round_deadline_ms=CEILING_MS)
    for _ in range(5):  # until the deadline and the checks are learnt
        _check_clean(_answer(core), reference)
        deadline_s, first_check_s, check_s = core.deadline.plan(5, CEILING_MS / 1000, None)
        if core.deadline.check_timeout_s(None) is not None:
            break
    else:
        pytest.fail("5 answers and the checks are still not learnt")
    # Checked every 100 ms while a pass of 250 ms runs: the answered checks must not give it up.
    assert first_check_s == check_s == 0.1 and PASS_S < deadline_s < CEILING_MS / 1000
    timeline = Timeline()
    result = _answer(core, on_tokens=timeline.fault_after(12, lambda: shaper.set_conditions(mode="blackhole")))
    [switch] = result.switches
    assert switch.cause == SwitchCause.LATE_VERDICT and "no answer to a link check" in switch.reason, switch.reason
    waited_s = int(re.search(r"no reply within (\d+) ms", switch.reason)[1]) / 1000
    learnt_s = int(re.search(r"deadline (\d+) ms\)", switch.reason)[1]) / 1000
    assert waited_s < learnt_s, switch.reason
    _check_stall(timeline, result, reference, waited_s, f" (deadline {learnt_s} s)")


def test_a_black_hole_is_caught_while_the_drafter_drafts_ahead(drafter, channel, shaper, reference,
                                                              monkeypatch) -> None:
    real_round, real_append, slow = verifier.target_round, DrafterSession._append, [False]

    def slow_round(*args, **kwargs):
        time.sleep(PASS_S)
        return real_round(*args, **kwargs)

    def slow_append(self, ids):
        if slow[0]:
            time.sleep(DRAFT_PASS_S)
        return real_append(self, ids)

    monkeypatch.setattr(verifier, "target_round", slow_round)
    monkeypatch.setattr(DrafterSession, "_append", slow_append)
    core = _core(drafter, channel, shaper, round_deadline_ms=CEILING_MS, draft_len=16)
    for _ in range(5):  # until the deadline and the checks are learnt
        _check_clean(_answer(core), reference)
        if core.deadline.check_timeout_s(None) is not None and core.deadline.deadline_s(17, CEILING_MS / 1000) < 1:
            break
    else:
        pytest.fail("5 answers and the checks are still not learnt")
    slow[0] = True
    timeline = Timeline()
    result = _answer(core, on_tokens=timeline.fault_after(12, lambda: shaper.set_conditions(mode="blackhole")))
    [switch] = result.switches
    assert switch.cause == SwitchCause.LATE_VERDICT and "no answer to a link check" in switch.reason, switch.reason
    timeout_s = int(re.search(r"link check within (\d+) ms", switch.reason)[1]) / 1000
    stall = timeline.first_local() - timeline.fault_at
    # The first check 100 ms into the wait, begun at the next drafter pass; its timeout; the pass
    # that sees it; the first local token. Drafting 16 ahead alone takes 16 x 50 ms.
    bound = 0.1 + timeout_s + 4 * DRAFT_PASS_S + 0.15
    log.info("stall %.3f s, check timeout %.3f s, bound %.3f s: %s", stall, timeout_s, bound, switch.reason)
    assert stall <= bound, (stall, bound, switch.reason)
    m = result.verified_tokens
    assert m >= 12 and tuple(result.tokens[:m]) == reference[:m] and timeline.tokens == result.tokens


def test_a_link_that_dies_in_the_middle_of_a_slow_round_is_caught_within_a_check(drafter, channel, shaper,
                                                                                reference, monkeypatch) -> None:
    """The link dies 250 ms into a 700 ms pass, after the round's first check was answered: the
    next check comes within 100 ms (not after the quickest quarter of rounds, ~700 ms here), and
    its timeout ends the wait."""
    real_round, countdown = verifier.target_round, [0]  # the fault strikes in the pass that takes it to 0
    timeline = Timeline()

    def slow_round(*args, **kwargs):
        countdown[0] -= 1
        if countdown[0] == 0:
            time.sleep(MID_ROUND_FAULT_S)
            timeline.strike(lambda: shaper.set_conditions(mode="blackhole"))
            time.sleep(MID_ROUND_PASS_S - MID_ROUND_FAULT_S)
        else:
            time.sleep(MID_ROUND_PASS_S)
        return real_round(*args, **kwargs)

    monkeypatch.setattr(verifier, "target_round", slow_round)
    core = _core(drafter, channel, shaper, round_deadline_ms=CEILING_MS)
    for _ in range(5):  # until the deadline and the checks are learnt
        _check_clean(_answer(core, n=MID_ROUND_N), reference, n=MID_ROUND_N)
        deadline_s, first_check_s, check_s = core.deadline.plan(5, CEILING_MS / 1000, None)
        if core.deadline.check_timeout_s(None) is not None and deadline_s < CEILING_MS / 1000:
            break
    else:
        pytest.fail("5 answers and the checks are still not learnt")
    assert first_check_s == check_s == 0.1 and deadline_s > MID_ROUND_PASS_S
    countdown[0] = 3  # the third round: past the stream's first, which waits the ceiling unchecked
    result = _answer(core, on_tokens=timeline.mark)
    [switch] = result.switches
    assert switch.cause == SwitchCause.LATE_VERDICT and "no answer to a link check" in switch.reason, switch.reason
    timeout_s = int(re.search(r"link check within (\d+) ms", switch.reason)[1]) / 1000
    stall = timeline.first_local() - timeline.fault_at
    # The next check within 100 ms of the fault, its timeout, the first local token. Checked again
    # only after the quickest quarter of rounds, the wait would pass the fault by ~450 ms more.
    bound = 0.1 + timeout_s + 0.2
    log.info("stall %.3f s, check timeout %.3f s, bound %.3f s: %s", stall, timeout_s, bound, switch.reason)
    assert stall <= bound, (stall, bound, switch.reason)
    m = result.verified_tokens
    assert tuple(result.tokens[:m]) == reference[:m] and timeline.tokens == result.tokens


def _check_stall(timeline: Timeline, result: Any, reference: Sequence[int], waited_s: float, note: str) -> None:
    """The first local token came within the wait, three rounds and the slack after the fault;
    the tokens verified before it are the reference's, and every token was delivered once, in order."""
    end = timeline.first_local()
    bound = waited_s + 3 * timeline.round_s() + SLACK_S
    measured = (f"fault -> first local token {end - timeline.fault_at:.3f} s, waited {waited_s} s{note}, "
                f"round {timeline.round_s():.3f} s, bound {bound:.3f} s")
    log.info("stall: %s", measured)
    assert end - timeline.fault_at <= bound, measured
    m = result.verified_tokens
    assert m >= 12 and tuple(result.tokens[:m]) == reference[:m]
    assert timeline.tokens == result.tokens  # every token delivered once, in order
