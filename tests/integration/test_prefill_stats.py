"""What building the KV caches cost reaches the client: the cloud's ServerTiming counts and the
drafter's prefill, from the edge's cloud link through its statistics, the edge's GenerationStats
(which the orchestrator passes on unchanged), the SDK's Stats and the OpenAI `tandem` extension.

The cloud is a fake verifier on 127.0.0.1 (port 0) that reports fixed counts and answers every
round with a correction, so the test does not depend on what the real cloud reports yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from edge_node.cloud_link import CloudLink, SessionRequest
from edge_node.drafter import DrafterModel
from edge_node.generation import generate_speculative
from edge_node.servicer import stats_to_proto
from orchestrator.openai_run import tandem_json
from protos.tandem.v1 import cloud_pb2, common_pb2, orchestrator_pb2
from tandem_core.sampling import SamplingParams
from tandem_sdk import _convert

PROMPT = [5, 17, 99, 3, 44, 101, 7]
N = 6
REUSED = 3
CORRECTION = 9  # never the tiny models' EOS


def _verify(requests: Iterator[cloud_pb2.VerifyRequest], context: grpc.ServicerContext
            ) -> Iterator[cloud_pb2.VerifyResponse]:
    made, budget = 0, 0
    for request in requests:
        if request.WhichOneof("kind") == "open":
            spec, budget = request.open, request.open.max_new_tokens
            timing = cloud_pb2.ServerTiming(prefill_tokens=len(spec.prompt_tokens) - REUSED, reused_tokens=REUSED)
            yield cloud_pb2.VerifyResponse(opened=cloud_pb2.SessionOpened(
                prompt_len=len(spec.prompt_tokens), max_draft_len=8, max_context=512, replica="fake", timing=timing))
            continue
        drafts = list(request.round.draft_tokens)
        token = CORRECTION if not drafts or drafts[0] != CORRECTION else CORRECTION + 1
        made += 1
        finished = made >= budget
        yield cloud_pb2.VerifyResponse(verdict=cloud_pb2.Verdict(
            round=request.round.round, accepted=0, tokens=[token], finished=finished,
            finish_reason=common_pb2.FINISH_REASON_LENGTH if finished else common_pb2.FINISH_REASON_UNSPECIFIED,
            timing=cloud_pb2.ServerTiming(batch_sessions=3)))
        if finished:
            return


@pytest.fixture(scope="module")
def fake_cloud() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.stream_stream_rpc_method_handler(_verify, request_deserializer=cloud_pb2.VerifyRequest.FromString,
                                                    response_serializer=cloud_pb2.VerifyResponse.SerializeToString)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("tandem.v1.CloudVerifier",
                                                                          {"Verify": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_prefill_counts_reach_the_sdk_and_the_openai_extension(tiny_models, fake_cloud: str) -> None:
    drafter = DrafterModel(tiny_models.drafter_onnx)
    with grpc.insecure_channel(fake_cloud) as channel:
        link = CloudLink(channel, SessionRequest("s", tuple(PROMPT), SamplingParams(), 0, N))
        result = generate_speculative(drafter, link, PROMPT, SamplingParams(), 0, draft_len=3, max_new_tokens=N,
                                      max_resumes=0)
    assert len(result.tokens) == result.verified_tokens == N and not result.switches
    assert link.batch_sessions == [3] * N
    s = result.stats
    assert (s.cloud_prefill_tokens, s.cloud_reused_tokens, s.drafter_prefill_tokens) == (len(PROMPT) - REUSED,
                                                                                          REUSED, len(PROMPT))
    assert result.drafter_prefill_s > 0

    generation = stats_to_proto(result)
    assert (generation.cloud_prefill_tokens, generation.cloud_reused_tokens, generation.drafter_prefill_tokens) == (
        len(PROMPT) - REUSED, REUSED, len(PROMPT))
    assert generation.drafter_prefill_ms == pytest.approx(1000 * result.drafter_prefill_s, rel=1e-3)
    # The orchestrator forwards the edge's GenerationStats as they are (orchestrator.core).
    final = orchestrator_pb2.OrchestratorStats(route="speculative", generation=generation)
    sdk = _convert.stats(final)
    assert (sdk.cloud_prefill_tokens, sdk.cloud_reused_tokens, sdk.drafter_prefill_tokens) == (
        len(PROMPT) - REUSED, REUSED, len(PROMPT))
    assert sdk.drafter_prefill_ms > 0
    extension = tandem_json(None, final)
    assert (extension["cloud_prefill_tokens"], extension["cloud_reused_tokens"],
            extension["drafter_prefill_tokens"]) == (len(PROMPT) - REUSED, REUSED, len(PROMPT))
