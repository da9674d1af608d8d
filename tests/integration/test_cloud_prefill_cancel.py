"""A session's prefill stops when its caller goes away (tiny fp32 target, plain gRPC server).

A client that opens a long prompt and cancels (or a Generate call cancelled while it opens) used
to leave the replica prefilling the whole prompt for nobody. The batcher here takes one prompt
row per pass and each pass is slowed by 10 ms, so a whole 150-token prefill takes about 150
passes and 1.5 s: a cancel must stop it within a few passes, free the session, and leave the
replica serving.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from cloud_node.errors import SessionGone
from cloud_node.verifier import Limits, SessionSpec, VerifierCore
from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc
from tests.support.cloud_client import CloudVerifierClient, draft_round
from tests.support.cloud_server import serving


def prompt(seed: int) -> list[int]:
    """150 tokens that share no prefix with another seed's (a closed session's KV stays cached)."""
    return [(7 * i + 31 * seed) % 400 + 3 for i in range(150)]


LIMITS = Limits(max_sessions=4, max_context=200, max_new_tokens=16)


@pytest.fixture(scope="module")
def core(tiny_models) -> Iterator[VerifierCore]:
    core = VerifierCore.load(tiny_models.target_hf, dtype="fp32", limits=LIMITS, model_name="tiny")
    yield core
    core.target.close()


@pytest.fixture()
def slow_passes(core: VerifierCore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core.target.batcher, "max_rows", 1)  # the target's own floor is 17 rows
    engine = core.target.batcher.engine
    forward = engine.forward

    def slow(rows):
        time.sleep(0.01)
        return forward(rows)

    monkeypatch.setattr(engine, "forward", slow)


def passes(core: VerifierCore) -> int:
    return core.target.batcher.stats().passes


def wait_until(check, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def assert_stopped_early(core: VerifierCore, start: int) -> None:
    """The session is gone, and no further pass runs for it."""
    wait_until(lambda: len(core.store) == 0)
    stopped = passes(core)
    time.sleep(0.3)  # 30 more passes if the prefill went on
    assert passes(core) == stopped
    assert stopped - start < 40, f"{stopped - start} passes for a prefill cancelled after its first"


def still_serves(address: str) -> None:
    with CloudVerifierClient(address) as client:
        client.open(cloud_pb2.SessionSpec(session_id="after", prompt_tokens=[5, 17, 99], max_new_tokens=4))
        verdict = client.verify(draft_round(0, [5]))
        assert len(verdict.tokens) >= 1


def test_open_stops_its_prefill_once_the_caller_is_gone(core: VerifierCore, slow_passes: None) -> None:
    start = passes(core)
    spec = SessionSpec(session_id="gone", prompt_tokens=tuple(prompt(1)), max_new_tokens=8)
    with pytest.raises(SessionGone):
        core.open(spec, cancelled=lambda: passes(core) - start >= 3)
    assert len(core.store) == 0
    assert passes(core) - start <= 5
    opened = core.open(SessionSpec(session_id="again", prompt_tokens=tuple(prompt(1)), max_new_tokens=8))
    try:  # the same prompt opens in full afterwards (the dropped part left nothing behind)
        assert opened.prompt_len == 150
        assert passes(core) - start >= 150 - 1
    finally:
        core.close(opened.session)


def test_a_verify_stream_cancelled_while_it_opens_stops_the_prefill(core: VerifierCore, slow_passes: None) -> None:
    with serving(core) as address, grpc.insecure_channel(address) as channel:
        start = passes(core)
        stub = cloud_pb2_grpc.CloudVerifierStub(channel)
        requests = iter([cloud_pb2.VerifyRequest(open=cloud_pb2.SessionSpec(
            session_id="cancel", prompt_tokens=prompt(2), max_new_tokens=8))])
        call = stub.Verify(requests, timeout=30)
        wait_until(lambda: passes(core) - start >= 2)
        call.cancel()
        assert_stopped_early(core, start)
        still_serves(address)


def test_a_generate_call_cancelled_while_it_opens_stops_the_prefill(core: VerifierCore, slow_passes: None) -> None:
    with serving(core) as address, grpc.insecure_channel(address) as channel:
        start = passes(core)
        stub = cloud_pb2_grpc.CloudVerifierStub(channel)
        call = stub.Generate(cloud_pb2.GenerateRequest(session=cloud_pb2.SessionSpec(
            session_id="cancel-gen", prompt_tokens=prompt(3), max_new_tokens=8)), timeout=30)
        wait_until(lambda: passes(core) - start >= 2)
        call.cancel()
        assert_stopped_early(core, start)
        still_serves(address)
