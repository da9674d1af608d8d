"""Answers that reach the cloud's context end with finish reason "length", on both cloud routes.

A plain grpcio cloud with a small context (Limits(max_context=48)) and the tiny models: the
speculative route (the edge's `generate_speculative`, drafting more per round than the cloud
takes) and the cloud route (`generate_cloud`) both end at exactly max_context - prompt tokens,
equal to the target's own greedy tokens; a round whose drafts pass the context is cut, never
refused; the edge learns max_context and max_draft_len from SessionOpened and drafts within them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest

from cloud_node.servicer import create_server
from cloud_node.verifier import Limits, VerifierCore
from edge_node.cloud_link import CloudLink, SessionRequest
from edge_node.config import EdgeConfig
from edge_node.drafter import DrafterModel
from edge_node.generation import generate_cloud, generate_speculative
from edge_node.servicer import create_server as create_edge_server
from protos.tandem.v1 import cloud_pb2, common_pb2, edge_pb2, edge_pb2_grpc
from tandem.pair import LocalPair
from tandem_core.loop import Draft
from tandem_core.sampling import SamplingParams
from tandem_core.verify import FinishReason
from tests.support.cloud_client import CloudVerifierClient, draft_round

CONTEXT, MAX_DRAFT = 48, 4
PROMPT = [5, 17, 99, 3, 44, 101, 7, 8, 9, 10]
ROOM = CONTEXT - len(PROMPT)  # tokens an answer can have before the context is full
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=3)


@pytest.fixture(scope="module")
def core(tiny_models) -> VerifierCore:
    limits = Limits(max_sessions=4, max_context=CONTEXT, max_draft_len=MAX_DRAFT, max_new_tokens=256)
    return VerifierCore.load(tiny_models.target_hf, dtype="fp32", limits=limits, model_name="tiny")


@pytest.fixture(scope="module")
def address(core: VerifierCore) -> Iterator[str]:
    server, port = create_server(core, "127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture(scope="module")
def drafter(tiny_models) -> DrafterModel:
    return DrafterModel(tiny_models.drafter_onnx)


@pytest.fixture(scope="module")
def reference(tiny_models) -> tuple[int, ...]:
    pair = LocalPair(tiny_models.target_hf, None, dtype="fp32")
    return pair.target_generate(PROMPT, GREEDY, max_new_tokens=ROOM).tokens


def _spec(params: SamplingParams, prompt: list[int], max_new: int) -> cloud_pb2.SessionSpec:
    sampling = common_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        sampling.seed = params.seed
    return cloud_pb2.SessionSpec(session_id="ctx", prompt_tokens=prompt, sampling=sampling, max_new_tokens=max_new)


class SpyLink(CloudLink):
    """A CloudLink that records how deep each round's drafts go (a chain's length, a tree's depth)."""

    sent: list[int]

    def send_round(self, draft_tokens, q, assume=None, parents=None):  # type: ignore[no-untyped-def]
        self.sent.append(Draft(tuple(draft_tokens), None, parents=None if parents is None else tuple(parents)).depth)
        return super().send_round(draft_tokens, q, assume, parents)


@pytest.mark.parametrize("pipeline", [False, True], ids=["sequential", "pipelined"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_speculative_route_ends_with_length_at_the_cloud_context(address, drafter, reference, params,
                                                                 pipeline) -> None:
    """Up to the context's last token, with rounds ahead too: one that would assume a position
    past the context is dropped by the cloud, never refused."""
    with grpc.insecure_channel(address) as channel:
        link = SpyLink(channel, SessionRequest(uuid.uuid4().hex, tuple(PROMPT), params, 1, 200))
        link.sent = []
        # Sequential: round 1 carries drafts before SessionOpened came. Pipelined: round 1 is
        # answered with the open, and round 2, drafted ahead meanwhile, waits for SessionOpened.
        result = generate_speculative(drafter, link, PROMPT, params, 1, draft_len=12, max_new_tokens=200,
                                      max_resumes=0, pipeline=pipeline)
    assert result.resumes == 0 and not result.switches
    assert result.finish_reason == FinishReason.LENGTH
    assert len(result.tokens) == ROOM
    if params.greedy:
        assert tuple(result.tokens) == reference
    assert link.opened is not None and (link.opened.max_context, link.opened.max_draft_len) == (CONTEXT, MAX_DRAFT)
    if pipeline:  # a round ahead waits for SessionOpened (it must know rounds ahead are taken): within limits
        assert max(link.sent) <= MAX_DRAFT
    else:
        assert max(link.sent[1:]) <= MAX_DRAFT < link.sent[0]  # the first round drafts before SessionOpened


def test_cloud_route_ends_with_length_at_the_cloud_context(address, drafter, reference) -> None:
    with grpc.insecure_channel(address) as channel:
        result = generate_cloud(drafter, channel, PROMPT, GREEDY, 0, max_new_tokens=200, first_timeout_s=30,
                                gap_timeout_s=30, max_resumes=0)
    assert result.finish_reason == FinishReason.LENGTH
    assert tuple(result.tokens) == reference and len(result.tokens) == ROOM


def test_drafts_past_the_context_are_cut_not_refused(address, core) -> None:
    prompt = list(range(5, 5 + CONTEXT - 3))  # room for 3 tokens
    with CloudVerifierClient(address, round_timeout_s=30) as client:
        opened = client.open(_spec(GREEDY, prompt, 100))
        assert opened.max_context == CONTEXT
        verdict = client.verify(draft_round(0, [5, 6, 7, 8]))  # 4 drafts, room for 2 (+1 target token)
        assert verdict.accepted <= 2 and len(verdict.tokens) <= 3
        while not verdict.finished:
            verdict = client.verify(draft_round(1, [5, 6, 7, 8]))
        assert verdict.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert len(client.generated) == 3


def test_a_prompt_that_fills_the_context_is_refused_naming_the_field(address) -> None:
    with CloudVerifierClient(address) as client, pytest.raises(grpc.RpcError) as info:
        client.open(_spec(GREEDY, list(range(5, 5 + CONTEXT)), 10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_context" in info.value.details()


@pytest.mark.parametrize("mode", [edge_pb2.EDGE_MODE_CLOUD, edge_pb2.EDGE_MODE_SPECULATIVE])
def test_the_edge_passes_on_the_clouds_reason_for_refusing_a_prompt(address, drafter, mode) -> None:
    """The edge's context (the tiny drafter's 512) takes a prompt the cloud's (48) does not: the
    caller gets the cloud's reason, not only that it refused."""
    server, port = create_edge_server(drafter, EdgeConfig(cloud_address=address), "127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as info:
            list(edge_pb2_grpc.EdgeNodeStub(channel).Generate(edge_pb2.EdgeGenerateRequest(
                prompt_tokens=list(range(5, 5 + CONTEXT)), max_new_tokens=4, mode=mode), timeout=60))
    finally:
        server.stop(None)
    details = info.value.details()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "refused the request" in details and "max_context" in details and "cloud request id" in details
    assert len(details.splitlines()) == 1 and "Traceback" not in details
