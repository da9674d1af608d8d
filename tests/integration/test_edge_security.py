"""The edge node's own endpoint: TLS, its API key and the bind rule, on a real server with the tiny drafter.

The key reaches the node as a file (mode 0600); a caller without it gets UNAUTHENTICATED before
any generation starts, health answers without it, a plaintext caller fails the handshake, and a
non-loopback bind without TLS and a key is refused (in-process, and by the CLI with exit code 2).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_node.config import EdgeConfig
from edge_node.drafter import DrafterModel
from edge_node.servicer import create_node
from protos.tandem.v1 import edge_pb2, edge_pb2_grpc
from tandem.ops import devpki
from tandem.security import ClientTls, SecurityError, secure_channel, write_secret

KEY = "edge-key-7f3a9c1e5b"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> devpki.DevPki:
    return devpki.ensure(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def drafter(tiny_models) -> DrafterModel:
    return DrafterModel(tiny_models.target_onnx)


@pytest.fixture(scope="module")
def secure_edge(drafter, pki, tmp_path_factory):
    key_file = write_secret(tmp_path_factory.mktemp("keys") / "edge.key", KEY)
    config = EdgeConfig(tls_cert=pki.server_cert, tls_key=pki.server_key, api_key_file=key_file)
    node = create_node(drafter, config, "127.0.0.1:0")
    node.server.start()
    yield f"127.0.0.1:{node.port}"
    node.server.stop(None)


REQUEST = edge_pb2.EdgeGenerateRequest(prompt="def add(a, b):", max_new_tokens=4, mode=edge_pb2.EDGE_MODE_LOCAL)


def _generate(address: str, pki: devpki.DevPki, key: str | None) -> list[edge_pb2.EdgeGenerateResponse]:
    with secure_channel(address, ClientTls(pki.ca_cert), key) as channel:
        return list(edge_pb2_grpc.EdgeNodeStub(channel).Generate(REQUEST, timeout=60))


def test_the_key_over_tls_generates(secure_edge, pki) -> None:
    replies = _generate(secure_edge, pki, KEY)
    assert replies[-1].stats.generated_tokens == 4


@pytest.mark.parametrize("key", [None, "wrong", KEY + "x"])
def test_no_or_a_wrong_key_is_unauthenticated(secure_edge, pki, key) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _generate(secure_edge, pki, key)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and KEY not in (err.value.details() or "")


@pytest.mark.parametrize("method", ["/tandem.v1.EdgeNode/CountTokens", "/tandem.v1.EdgeNode/Generate"])
@pytest.mark.parametrize("key", [None, "wrong"])
def test_bad_bytes_without_the_key_are_unauthenticated_not_parsed(secure_edge, pki, method: str, key) -> None:
    """The key is checked before the request is read: a caller without it learns nothing of
    the method's message (INVALID_ARGUMENT would tell it the bytes were read)."""
    with secure_channel(secure_edge, ClientTls(pki.ca_cert), key) as channel:
        call = (channel.unary_unary if method.endswith("CountTokens") else channel.unary_stream)(method)
        with pytest.raises(grpc.RpcError) as err:
            reply = call(b"\xff\xff", timeout=10)
            if method.endswith("Generate"):
                list(reply)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_tls_but_no_key(secure_edge, pki) -> None:
    with secure_channel(secure_edge, ClientTls(pki.ca_cert), None) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(secure_edge) as channel, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_non_loopback_bind_needs_tls_and_a_key(drafter, pki, tmp_path: Path) -> None:
    key_file = write_secret(tmp_path / "k", KEY)
    for config in (EdgeConfig(), EdgeConfig(api_key_file=key_file),
                   EdgeConfig(tls_cert=pki.server_cert, tls_key=pki.server_key)):
        with pytest.raises(SecurityError, match="non-loopback"):
            create_node(drafter, config, "0.0.0.0:0")
    node = create_node(drafter, EdgeConfig(insecure=True), "0.0.0.0:0")  # asked for by name
    node.server.stop(None)


def test_the_cli_refuses_an_unsafe_bind_with_exit_2(tiny_models) -> None:
    out = subprocess.run([sys.executable, "-m", "edge_node", "--host", "0.0.0.0", "--drafter",
                          str(tiny_models.target_onnx)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "non-loopback" in out.stderr and "--insecure" in out.stderr
    secret = subprocess.run([sys.executable, "-m", "edge_node", "--cloud-token", "tdm_shown_in_ps"],
                            capture_output=True, text=True, timeout=120)
    assert secret.returncode == 2 and "tdm_shown_in_ps" not in secret.stderr + secret.stdout
