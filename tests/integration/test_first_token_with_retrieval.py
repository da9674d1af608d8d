"""The first token comes from the cloud's prefill even when retrieval already matches the prompt's
tail: the open asks for round 1 with no drafts (SessionSpec.first_round), and a copy goes out only
in later rounds. Sent as round 1, the copy made the first token wait for a verification pass over
the whole copy (BENCHMARKS.md, "A copied round 1 held back the first token").

The cloud is a fake verifier on 127.0.0.1 (port 0), with the real edge (tiny ONNX drafter,
`generate_speculative`, `CloudLink`): it follows the protocol (first_round, assumptions checked
against what it committed, dropped rounds) and answers every round with the target "token" that
continues a fixed answer, so the test does not need a target model.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from edge_node.cloud_link import CloudLink, SessionRequest
from edge_node.drafter import DrafterModel
from edge_node.generation import generate_speculative
from protos.tandem.v1 import cloud_pb2, common_pb2
from tandem_core.sampling import SamplingParams

# The tail (5, 17, 99, 3) repeats the prompt's start: retrieval matches it (match length 4).
PROMPT = [5, 17, 99, 3, 44, 101, 7, 60, 5, 17, 99, 3]
ANSWER = [44, 101, 7, 60, 5, 17, 99, 3, 44, 101]  # what the "target" says: the prompt's continuation
N = len(ANSWER)


class _FakeCloud:
    def __init__(self) -> None:
        self.opens: list[cloud_pb2.SessionSpec] = []
        self.rounds: list[cloud_pb2.DraftRound] = []

    def verify(self, requests: Iterator[cloud_pb2.VerifyRequest], context: grpc.ServicerContext
               ) -> Iterator[cloud_pb2.VerifyResponse]:
        committed: list[int] = []
        for request in requests:
            if request.WhichOneof("kind") == "open":
                spec = request.open
                self.opens.append(spec)
                committed = list(spec.prompt_tokens) + list(spec.generated_tokens)
                yield cloud_pb2.VerifyResponse(opened=cloud_pb2.SessionOpened(
                    prompt_len=len(spec.prompt_tokens), max_draft_len=16, max_context=512, replica="fake",
                    pipelining=True))
                if spec.first_round:
                    yield self._answer(cloud_pb2.DraftRound(round=1), committed)
                continue
            self.rounds.append(request.round)
            yield self._answer(request.round, committed)
            if len(committed) - len(PROMPT) >= N:
                return

    @staticmethod
    def _answer(r: cloud_pb2.DraftRound, committed: list[int]) -> cloud_pb2.VerifyResponse:
        if r.assume_position and (len(committed) != r.assume_position or committed[-1] != r.assume_token):
            return cloud_pb2.VerifyResponse(verdict=cloud_pb2.Verdict(round=r.round, dropped=True))
        at = len(committed) - len(PROMPT)
        accepted = 0
        for token in r.draft_tokens:
            if at + accepted < N - 1 and token == ANSWER[at + accepted]:
                accepted += 1
            else:
                break
        tokens = ANSWER[at:at + accepted + 1]
        committed.extend(tokens)
        finished = len(committed) - len(PROMPT) >= N
        return cloud_pb2.VerifyResponse(verdict=cloud_pb2.Verdict(
            round=r.round, accepted=accepted, tokens=tokens, finished=finished,
            finish_reason=common_pb2.FINISH_REASON_LENGTH if finished else common_pb2.FINISH_REASON_UNSPECIFIED))


@pytest.fixture()
def fake_cloud() -> Iterator[tuple[str, _FakeCloud]]:
    cloud = _FakeCloud()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.stream_stream_rpc_method_handler(cloud.verify, request_deserializer=cloud_pb2.VerifyRequest.FromString,
                                                    response_serializer=cloud_pb2.VerifyResponse.SerializeToString)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("tandem.v1.CloudVerifier",
                                                                          {"Verify": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", cloud
    server.stop(None)


def test_fake_cloud_first_token_from_the_prefill_even_when_retrieval_matches_the_prompt_tail(
        tiny_models, fake_cloud: tuple[str, _FakeCloud]) -> None:
    from tandem_core.suffix_index import SuffixIndex

    assert SuffixIndex.over(PROMPT).propose(16).match_len >= 4  # the premise: retrieval has a copy ready
    address, cloud = fake_cloud
    drafter = DrafterModel(tiny_models.drafter_onnx)
    with grpc.insecure_channel(address) as channel:
        link = CloudLink(channel, SessionRequest("s", tuple(PROMPT), SamplingParams(), 0, N), round_timeout_s=30)
        result = generate_speculative(drafter, link, PROMPT, SamplingParams(), 0, draft_len=3, max_new_tokens=N,
                                      max_resumes=0)
    assert result.tokens == ANSWER and not result.switches
    assert len(cloud.opens) == 1 and cloud.opens[0].first_round  # round 1, no drafts, answered with the open
    assert all(r.round != 1 for r in cloud.rounds)  # never sent again, with a copy in it
    assert result.stats.retrieval_drafted > 0  # the copy still went out, in a later round
