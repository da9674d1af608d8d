"""Rounds prepared for the likeliest other verdict (`alternatives`, greedy) over a real gRPC link
with 60 ms of round-trip time (the netshape shaper on loopback), tiny models: the answer is the
target's greedy answer token for token, and rounds were prepared on the way.

The tiny random drafter rarely agrees with the tiny target, so most rounds end at a rejection:
the case the prepared rounds are for."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest

from cloud_node.verifier import VerifierCore
from edge_node.cloud_link import CloudLink, SessionRequest
from edge_node.drafter import DrafterModel
from edge_node.generation import generate_speculative
from netshape.shaper import LinkShaper
from tandem.pair import LocalPair
from tandem_core.sampling import SamplingParams
from tests.support.cloud_server import serving

GREEDY = SamplingParams()
PROMPTS = [[5, 17, 99, 3, 44, 101, 7], [200 + (i * 7) % 90 for i in range(30)], [11, 11, 12, 11, 11, 12, 11]]
N = 24


@pytest.fixture(scope="module")
def link_address(tiny_models) -> Iterator[str]:
    with serving(VerifierCore.load(tiny_models.target_hf, dtype="fp32")) as cloud, LinkShaper(cloud) as shaper:
        shaper.set_conditions(rtt_ms=60)
        host, port = shaper.address
        yield f"{host}:{port}"


def test_prepared_rounds_keep_the_greedy_answer(tiny_models, link_address) -> None:
    drafter = DrafterModel(tiny_models.drafter_onnx)
    pair = LocalPair(tiny_models.target_hf, None, dtype="fp32")
    tries = hits = 0
    with grpc.insecure_channel(link_address) as channel:
        for prompt in PROMPTS:
            link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, tuple(prompt), GREEDY, 0, N),
                             round_timeout_s=30.0)
            result = generate_speculative(drafter, link, prompt, GREEDY, 0, draft_len=4, max_new_tokens=N,
                                          alternatives=True)
            assert tuple(result.tokens) == pair.target_generate(prompt, GREEDY, max_new_tokens=N).tokens
            assert result.resumes == 0
            tries, hits = tries + result.stats.alt_tries, hits + result.stats.alt_hits
    assert tries > 0  # 60 ms per round leaves the drafter time to prepare rounds
    assert 0 <= hits <= tries
