"""The edge's speculative client against a real cloud verifier server, through the link shaper.

Real gRPC on 127.0.0.1, the tiny target in fp32 on the cloud side and the tiny ONNX drafter on
the edge side. The link is cut, black-holed and slowed in the middle of answers; every answer
must equal the undisturbed one, token for token. A tampering proxy in the shaper's place
rewrites verdicts on the wire: the edge must commit nothing from them.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest

from cloud_node.verifier import VerifierCore
from edge_node.cloud_link import CloudLink, SessionRequest, cloud_generate
from edge_node.drafter import DrafterModel
from edge_node.generation import EdgeResult, generate_speculative
from netshape.shaper import LinkShaper
from protos.tandem.v1 import cloud_pb2
from tandem.pair import LocalPair
from tandem_core.loop import SwitchCause
from tandem_core.sampling import SamplingParams
from tests.support.cloud_server import serving
from tests.support.tamper_proxy import TamperProxy

PROMPT = [5, 17, 99, 3, 44, 101, 7]
N = 40


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


def _run(drafter: DrafterModel, address: str, params: SamplingParams = GREEDY, *, seed: int = 0,
         on_tokens=None, round_timeout_s: float = 5.0) -> EdgeResult:
    with grpc.insecure_channel(address) as channel:
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


def test_a_black_holed_link_mid_answer_resumes_after_the_round_deadline(drafter, shaper, reference) -> None:
    seen: list[int] = []

    def blackhole_once(tokens, _source) -> None:
        seen.extend(tokens)
        if len(seen) >= 8 and -1 not in seen:
            shaper.set_conditions(mode="blackhole")
            # Restore the link a little after the round deadline has fired.
            threading.Timer(1.2, lambda: shaper.set_conditions(mode="up")).start()
            seen.append(-1)

    result = _run(drafter, _address(shaper), on_tokens=blackhole_once, round_timeout_s=1.0)
    assert tuple(result.tokens) == reference
    assert result.resumes >= 1


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
    v.tokens.append(v.tokens[-1])
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
    assert tamper.changed == 3 and result.resumes == 2  # two bad verdicts resumed, the third gives up
    assert [(s.cause, s.at_token) for s in result.switches] == [(SwitchCause.BAD_VERDICT, m)]
    assert m > 0 and tuple(result.tokens[:m]) == reference[:m]
    # The drafter's cache held exactly the committed tokens: it goes on as a fresh session would.
    fresh = drafter.new_session([*PROMPT, *result.tokens[:m]], GREEDY, 0)
    assert result.tokens[m:] == list(fresh.generate(max_new_tokens=N - m, eos_ids=drafter.eos_ids))
