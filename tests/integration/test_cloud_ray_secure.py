"""The secure cloud node on a real local Ray instance: `python -m cloud_node` with TLS and a token
store (one start for the module: 1 replica of the tiny fp32 target), reached through its gateway.

Checks, each against the real process: a plaintext client fails the handshake; no token and a
wrong token get UNAUTHENTICATED, a revoked one PERMISSION_DENIED within the stated bound (1 s);
a valid token gives the target's greedy text; Serve's own port (the gateway's upstream) refuses
a call that did not come through the gateway, even one carrying a valid token; a device is held
to its session limit; health answers without a token; no token reaches the cloud's log.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cloud_node.tokens import TokenStore
from tandem.ops import devpki
from tandem.pair import LocalPair
from tandem.ports import free_ports
from tandem.security import ClientTls, secure_channel
from tandem_core.sampling import SamplingParams
from tests.integration.test_cloud_ray import Cloud, spec_for, speculative, start_cloud
from tests.support.cloud_client import CloudVerifierClient

PROMPT = [5, 17, 99, 3, 44]
GREEDY = SamplingParams()


@dataclass
class Secure:
    cloud: Cloud
    serve_port: int
    pki: devpki.DevPki
    store: TokenStore
    token: str


@pytest.fixture(scope="module")
def secure(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    work = tmp_path_factory.mktemp("secure-cloud")
    pki = devpki.ensure(work / "pki")
    store = TokenStore(work / "tokens.json")
    _, token = store.issue("edge-1", max_sessions=2)
    log, serve_port = work / "cloud.log", free_ports(1)[0]
    cloud = start_cloud(["--port", "0", "--serve-port", str(serve_port), "--model-dir", str(tiny_models.target_hf),
                         "--dtype", "fp32", "--replicas", "1", "--replica-cpus", "0.5", "--max-new-tokens", "64",
                         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                         "--tokens-file", str(store.path)], log)
    try:
        yield Secure(cloud, serve_port, pki, store, token)
    finally:
        assert cloud.stop() == 0
        logged = log.read_text()
        assert token not in logged and token.rsplit("_", 1)[1] not in logged


@pytest.fixture(scope="module")
def pair(tiny_models) -> LocalPair:
    return LocalPair(tiny_models.target_hf, tiny_models.drafter_onnx, dtype="fp32")


@contextlib.contextmanager
def _client(s: Secure, token: str | None, *, plain_address: str | None = None,
            metadata: tuple[tuple[str, str], ...] = ()) -> Iterator[CloudVerifierClient]:
    channel = grpc.insecure_channel(plain_address) if plain_address else \
        secure_channel(s.cloud.address, ClientTls(s.pki.ca_cert), token)
    with channel, CloudVerifierClient("", channel=channel, round_timeout_s=30, max_resumes=0,
                                      metadata=metadata) as client:
        yield client


def _open_code(s: Secure, token: str | None, **kwargs: object) -> grpc.StatusCode:
    """The status of opening one session (OK when it opened; it is closed again)."""
    from tests.support.cloud_client import StreamBroken

    try:
        with _client(s, token, **kwargs) as client:  # type: ignore[arg-type]
            client.open(spec_for(PROMPT, GREEDY, 8))
        return grpc.StatusCode.OK
    except StreamBroken as exc:
        return exc.code or grpc.StatusCode.UNKNOWN
    except grpc.RpcError as exc:
        return exc.code()


def test_a_valid_token_gives_the_targets_text(secure: Secure, pair: LocalPair) -> None:
    with _client(secure, secure.token) as client:
        got = speculative(client, pair, PROMPT, GREEDY, 24)
    assert tuple(got) == pair.target_generate(PROMPT, GREEDY, max_new_tokens=24).tokens


def test_health_needs_no_token_but_tls(secure: Secure) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with secure_channel(secure.cloud.address, ClientTls(secure.pki.ca_cert), None) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(secure.cloud.address) as channel, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_no_token_wrong_token_and_revoked_token_are_refused(secure: Secure, tmp_path: Path) -> None:
    assert _open_code(secure, None) == grpc.StatusCode.UNAUTHENTICATED
    assert _open_code(secure, "tdm_" + "0" * 12 + "_" + "x" * 43) == grpc.StatusCode.UNAUTHENTICATED
    record, token = secure.store.issue("to-revoke")
    assert _open_code(secure, token) == grpc.StatusCode.OK  # works at once after issue
    secure.store.revoke(record.id)
    t0 = time.monotonic()
    while (code := _open_code(secure, token)) == grpc.StatusCode.OK:
        assert time.monotonic() - t0 < 1.0 + 0.5, "the revocation was not seen within its bound (1 s)"
        time.sleep(0.05)
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_serves_own_port_refuses_calls_that_bypass_the_gateway(secure: Secure) -> None:
    """Serve's proxy is plaintext and listens on every interface (Serve 2.60); the replica refuses
    any call without the gateway's secret, a valid device token notwithstanding."""
    serve = f"127.0.0.1:{secure.serve_port}"
    assert _open_code(secure, None, plain_address=serve,
                      metadata=(("authorization", f"Bearer {secure.token}"),)) == grpc.StatusCode.UNAUTHENTICATED
    assert _open_code(secure, None, plain_address=serve,
                      metadata=(("tandem-gateway", "guess"),)) == grpc.StatusCode.UNAUTHENTICATED


def test_a_device_is_held_to_its_session_limit(secure: Secure) -> None:
    with _client(secure, secure.token) as first, _client(secure, secure.token) as second:
        for client in (first, second):
            client.open(spec_for(PROMPT, GREEDY, 8))
        assert _open_code(secure, secure.token) == grpc.StatusCode.RESOURCE_EXHAUSTED
    t0 = time.monotonic()
    while _open_code(secure, secure.token) != grpc.StatusCode.OK:
        assert time.monotonic() - t0 < 10, "closed sessions did not free the device's slots"
        time.sleep(0.1)
