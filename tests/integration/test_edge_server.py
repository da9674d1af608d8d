"""The edge node's gRPC service on a real server (127.0.0.1, port 0) with the tiny ONNX drafter."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_node.config import EdgeConfig
from edge_node.drafter import DrafterModel
from edge_node.servicer import create_server
from protos.tandem.v1 import common_pb2, edge_pb2, edge_pb2_grpc
from tandem_core.sampling import SamplingParams


@pytest.fixture(scope="module")
def edge(tiny_models):
    drafter = DrafterModel(tiny_models.target_onnx)
    server, port = create_server(drafter, EdgeConfig(cloud_address=None), "127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield drafter, channel
    channel.close()
    server.stop(None)


def _collect(stub, request):
    deltas, stats = [], None
    for msg in stub.Generate(request, timeout=60):
        if msg.WhichOneof("kind") == "delta":
            deltas.append(msg.delta)
        else:
            stats = msg.stats
    return deltas, stats


def test_local_generation_streams_the_drafters_greedy_output(edge) -> None:
    drafter, channel = edge
    stub = edge_pb2_grpc.EdgeNodeStub(channel)
    request = edge_pb2.EdgeGenerateRequest(prompt="def add(a, b):", max_new_tokens=20, mode=edge_pb2.EDGE_MODE_LOCAL)
    deltas, stats = _collect(stub, request)
    tokens = [t for d in deltas for t in d.tokens]
    ids = drafter.encode(prompt="def add(a, b):")
    expected = list(drafter.new_session(ids, SamplingParams(), 0).generate(max_new_tokens=20, eos_ids=drafter.eos_ids))
    assert tokens == expected
    assert "".join(d.text for d in deltas) == drafter.decode(tokens)
    assert stats.route == "local" and stats.generated_tokens == len(tokens) == stats.local_tokens
    assert stats.target_forwards == 0 and stats.ttft_ms > 0 and stats.tokens_per_s > 0


def test_chat_messages_use_the_chat_template(edge) -> None:
    drafter, channel = edge
    stub = edge_pb2_grpc.EdgeNodeStub(channel)
    request = edge_pb2.EdgeGenerateRequest(messages=[common_pb2.ChatMessage(role="user", content="Hello")],
                                           max_new_tokens=5, mode=edge_pb2.EDGE_MODE_LOCAL)
    deltas, stats = _collect(stub, request)
    assert stats.generated_tokens == len([t for d in deltas for t in d.tokens]) >= 1


@pytest.mark.parametrize("request_kwargs, field", [
    ({"max_new_tokens": 5}, "exactly one of prompt"),
    ({"prompt": "x", "prompt_tokens": [1], "max_new_tokens": 5}, "exactly one of prompt"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt_tokens": [10**6], "max_new_tokens": 5}, "prompt_tokens"),
    ({"prompt": "x", "max_new_tokens": 5, "sampling": {"temperature": -1.0}}, "temperature"),
    ({"prompt": "x", "max_new_tokens": 5, "sampling": {"temperature": 1.0, "top_p": 1.5}}, "top_p"),
    ({"prompt": "x", "max_new_tokens": 5, "mode": edge_pb2.EDGE_MODE_SPECULATIVE}, "cloud address"),
    ({"prompt": "x", "max_new_tokens": 5, "draft_len": 99}, "draft_len"),
])
def test_bad_requests_get_invalid_argument_and_the_server_keeps_serving(edge, request_kwargs, field) -> None:
    _, channel = edge
    stub = edge_pb2_grpc.EdgeNodeStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        _collect(stub, edge_pb2.EdgeGenerateRequest(**request_kwargs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    deltas, stats = _collect(stub, edge_pb2.EdgeGenerateRequest(prompt="ok", max_new_tokens=3,
                                                                mode=edge_pb2.EDGE_MODE_LOCAL))
    assert stats.generated_tokens >= 1


def test_health_is_serving(edge) -> None:
    _, channel = edge
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="tandem.v1.EdgeNode"),
                                                      timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
