"""A request cancelled while the drafter prefills its prompt frees its slot at the next pass.

On a busy device the drafter prefills about 50 tokens a second (a 4000-token prompt took 83 s
in a probe), and a prompt used to go in one pass: a client that cancelled held the edge's slot
until the whole prompt was in. The prompt now goes in passes of `LONG_PREFILL_CHUNK` tokens with a
cancel check before each. Here the chunk is 8 tokens and each pass is slowed by 30 ms (the tiny
drafter, 300 prompt tokens: about 38 passes and 1.1 s in all), so a cancel must stop the
prefill within a few passes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from edge_node import drafter as drafter_module
from edge_node.config import EdgeConfig
from edge_node.drafter import DrafterModel, DrafterSession, PrefillCancelled
from edge_node.servicer import EdgeServer, create_node
from protos.tandem.v1 import edge_pb2, edge_pb2_grpc
from tandem_core.sampling import SamplingParams

PROMPT = [(11 * i) % 400 + 5 for i in range(300)]
CHUNK = 8
PASSES = -(-len(PROMPT) // CHUNK)


@pytest.fixture(scope="module")
def drafter(tiny_models) -> DrafterModel:
    return DrafterModel(tiny_models.target_onnx)


@pytest.fixture()
def counted_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Prefill passes of CHUNK tokens, each 30 ms slower; the list counts the passes."""
    passes: list[int] = []
    append = DrafterSession._append

    def slow(self: DrafterSession, ids) -> None:  # type: ignore[no-untyped-def]
        passes.append(len(ids))
        time.sleep(0.03)
        append(self, ids)

    monkeypatch.setattr(drafter_module, "LONG_PREFILL_CHUNK", CHUNK)
    monkeypatch.setattr(DrafterSession, "_append", slow)
    return passes


def test_a_session_stops_prefilling_when_cancelled(drafter: DrafterModel, counted_passes: list[int]) -> None:
    with pytest.raises(PrefillCancelled):
        drafter.new_session(PROMPT, SamplingParams(temperature=0.5), seed=1, cancelled=lambda: len(counted_passes) >= 3)
    assert len(counted_passes) == 3
    counted_passes.clear()  # and uncancelled, the same prompt goes in CHUNK-token passes to the end
    session = drafter.new_session(PROMPT, SamplingParams(temperature=0.5), seed=1)
    assert session.cached == len(PROMPT) and len(counted_passes) == PASSES


@pytest.fixture()
def node(drafter: DrafterModel) -> Iterator[EdgeServer]:
    node = create_node(drafter, EdgeConfig(max_concurrent=1), "127.0.0.1:0")
    node.server.start()
    yield node
    node.server.stop(None)


def test_a_call_cancelled_during_the_prefill_frees_the_slot(node: EdgeServer, counted_passes: list[int]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{node.port}") as channel:
        stub = edge_pb2_grpc.EdgeNodeStub(channel)
        request = edge_pb2.EdgeGenerateRequest(prompt_tokens=PROMPT, max_new_tokens=4,
                                               mode=edge_pb2.EDGE_MODE_LOCAL)
        call = stub.Generate(request, timeout=30)
        reader = threading.Thread(target=lambda: [None for _ in call], daemon=True)
        reader.start()
        deadline = time.monotonic() + 10
        while len(counted_passes) < 2:
            assert time.monotonic() < deadline, "the prefill never started"
            time.sleep(0.005)
        call.cancel()
        while node.core.running:
            assert time.monotonic() < deadline, "the slot was never freed"
            time.sleep(0.005)
        assert len(counted_passes) < PASSES // 2, f"{len(counted_passes)} of {PASSES} passes ran after the cancel"
        # the one slot is free: the next answer runs
        answer = list(stub.Generate(edge_pb2.EdgeGenerateRequest(prompt="hello", max_new_tokens=2,
                                                                 mode=edge_pb2.EDGE_MODE_LOCAL), timeout=30))
        assert answer
