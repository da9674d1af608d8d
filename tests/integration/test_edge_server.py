"""The edge node's gRPC service on a real server (127.0.0.1, port 0) with the tiny ONNX drafter."""

from __future__ import annotations

import logging
import re
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_node.config import EdgeConfig
from edge_node.core import MAX_MESSAGES, MAX_PROMPT_CHARS
from edge_node.drafter import DrafterModel
from edge_node.servicer import create_node, create_server
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
    ({"prompt": "a\x00b", "max_new_tokens": 5}, "prompt: must not contain NUL"),  # the tokenizer would cut it
    ({"prompt": "x" * (MAX_PROMPT_CHARS + 1), "max_new_tokens": 5}, "prompt: longer than"),
    ({"messages": [{"role": "user", "content": "a\x00"}], "max_new_tokens": 5}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1), "max_new_tokens": 5}, "messages: more than"),
    ({"messages": [{"role": "x" * 100_000, "content": "hi"}], "max_new_tokens": 5}, "messages[0].role"),
    ({"prompt_tokens": [1] * 600, "max_new_tokens": 5}, "prompt_tokens: at most"),
    ({"prompt": "x", "max_new_tokens": 5, "round_deadline_ms": 2**32 - 1}, "round_deadline_ms"),
    ({"prompt": "x", "max_new_tokens": 5, "mode": 99}, "mode"),
])
def test_bad_requests_get_invalid_argument_and_the_server_keeps_serving(edge, request_kwargs, field) -> None:
    _, channel = edge
    stub = edge_pb2_grpc.EdgeNodeStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        _collect(stub, edge_pb2.EdgeGenerateRequest(**request_kwargs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details() and len(err.value.details()) < 200  # a bad value is quoted short
    deltas, stats = _collect(stub, edge_pb2.EdgeGenerateRequest(prompt="ok", max_new_tokens=3,
                                                                mode=edge_pb2.EDGE_MODE_LOCAL))
    assert stats.generated_tokens >= 1


def test_health_is_serving(edge) -> None:
    _, channel = edge
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="tandem.v1.EdgeNode"),
                                                      timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


REQUEST_ID = re.compile(r"\(request id ([0-9a-f]{16})\)$")


def _node(drafter: DrafterModel, **config):
    node = create_node(drafter, EdgeConfig(**config), "127.0.0.1:0")
    node.server.start()
    return node, grpc.insecure_channel(f"127.0.0.1:{node.port}")


def _refusal(channel, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _collect(edge_pb2_grpc.EdgeNodeStub(channel), request)
    return err.value


def test_a_server_fault_is_internal_with_only_a_request_id(edge, caplog) -> None:
    """The exception's text (paths, pids, addresses) goes to the log under the id, never to the client."""
    drafter, _ = edge
    node, channel = _node(drafter)

    def fail(job, on_tokens, cancelled=None):
        raise RuntimeError("boom in /home/me/secret.py, pid 4242, peer 10.1.2.3:7070")

    node.core.run = fail  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        err = _refusal(channel, edge_pb2.EdgeGenerateRequest(prompt="hi", max_new_tokens=3))
    channel.close()
    node.server.stop(None)
    assert err.code() == grpc.StatusCode.INTERNAL
    rid = REQUEST_ID.search(err.details()).group(1)
    assert err.details() == f"generation failed (request id {rid})"
    assert ("tandem-request-id", rid) in err.trailing_metadata()
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and "boom in /home/me/secret.py" in str(logged[0].exc_info[1])


def test_an_unforeseen_error_in_the_servicer_is_internal_not_unknown(edge) -> None:
    drafter, _ = edge
    node, channel = _node(drafter)

    def fail(*args):
        raise KeyError("/etc/secret")

    node.core.encode = fail  # type: ignore[method-assign]
    err = _refusal(channel, edge_pb2.EdgeGenerateRequest(prompt="hi", max_new_tokens=3))
    count = channel.unary_unary("/tandem.v1.EdgeNode/CountTokens",
                                request_serializer=edge_pb2.EdgeGenerateRequest.SerializeToString,
                                response_deserializer=edge_pb2.TokenCount.FromString)
    with pytest.raises(grpc.RpcError) as count_err:
        count(edge_pb2.EdgeGenerateRequest(prompt="hi"), timeout=10)
    channel.close()
    node.server.stop(None)
    for e in (err, count_err.value):
        assert e.code() == grpc.StatusCode.INTERNAL and REQUEST_ID.search(e.details())
        assert e.details().startswith("internal error") and "secret" not in e.details()


def test_an_unreachable_cloud_is_unavailable_without_its_address(edge) -> None:
    drafter, _ = edge
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node, channel = _node(drafter, cloud_address=f"127.0.0.1:{port}", max_resumes=0)
    err = _refusal(channel, edge_pb2.EdgeGenerateRequest(prompt="hi", max_new_tokens=3, open_deadline_ms=2000,
                                                         mode=edge_pb2.EDGE_MODE_SPECULATIVE))
    channel.close()
    node.server.stop(None)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details().startswith("the cloud verifier is unreachable (request id")
    assert "127.0.0.1" not in err.details() and str(port) not in err.details()
