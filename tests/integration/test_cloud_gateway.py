"""The cloud's gateway (TLS, per-device tokens, per-device limits) in front of a real verifier.

Real gRPC servers on 127.0.0.1: the tiny target behind `cloud_node.servicer`, the gateway in
front of it over TLS with a development CA (`tandem.ops.devpki`), and the edge's own channel
(`edge_node.servicer.cloud_channel`) and speculative loop on the tiny ONNX drafter. Every refused
call is checked at the verifier: no session was opened.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cloud_node import gateway as gw
from cloud_node.config import GatewayConfig
from cloud_node.tokens import TokenStore
from cloud_node.verifier import VerifierCore
from edge_node.cloud_link import CloudLink, CredentialRefused, SessionRequest
from edge_node.config import EdgeConfig
from edge_node.drafter import DrafterModel
from edge_node.generation import generate_speculative
from edge_node.servicer import cloud_channel
from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc
from tandem.ops import devpki
from tandem.pair import LocalPair
from tandem.security import SecurityError, write_secret
from tandem_core.loop import SwitchCause
from tandem_core.sampling import SamplingParams
from tests.support.cloud_server import serving

PROMPT = [5, 17, 99, 3, 44, 101, 7]
N = 24
GREEDY = SamplingParams()


class Counted:
    """The real core, counting the sessions it opens."""

    def __init__(self, core: VerifierCore) -> None:
        self.core, self.opened = core, 0
        original = core.open

        def open_(spec, cancelled=None):
            self.opened += 1
            return original(spec, cancelled)

        core.open = open_  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> devpki.DevPki:
    return devpki.ensure(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def counted(tiny_models) -> Counted:
    return Counted(VerifierCore.load(tiny_models.target_hf, dtype="fp32"))


@pytest.fixture(scope="module")
def upstream(counted) -> Iterator[str]:
    with serving(counted.core) as address:
        yield address


@pytest.fixture(scope="module")
def drafter(tiny_models) -> DrafterModel:
    return DrafterModel(tiny_models.drafter_onnx)


@pytest.fixture(scope="module")
def reference(tiny_models) -> tuple[int, ...]:
    pair = LocalPair(tiny_models.target_hf, None, dtype="fp32")
    return pair.target_generate(PROMPT, GREEDY, max_new_tokens=N).tokens


@pytest.fixture()
def store(tmp_path) -> TokenStore:
    return TokenStore(tmp_path / "tokens.json")


@pytest.fixture()
def secure(pki, store, upstream) -> Iterator[gw.InThread]:
    config = GatewayConfig(tls_cert=pki.server_cert, tls_key=pki.server_key, tokens_file=store.path)
    store.issue("bootstrap")  # the store must exist before the gateway reads it
    front = gw.InThread(gw.build(config, upstream, "gateway-secret"), "127.0.0.1:0")
    yield front
    front.stop()


def _token_file(tmp_path: Path, token: str) -> Path:
    return write_secret(tmp_path / f"token-{uuid.uuid4().hex[:6]}", token)


def _edge(port: int, pki: devpki.DevPki, token_file: Path | None) -> EdgeConfig:
    return EdgeConfig(cloud_address=f"127.0.0.1:{port}", cloud_ca_cert=pki.ca_cert, cloud_token_file=token_file)


def _speculative(drafter: DrafterModel, channel: grpc.Channel) -> tuple[int, ...]:
    link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, tuple(PROMPT), GREEDY, 0, N), round_timeout_s=10)
    return tuple(generate_speculative(drafter, link, PROMPT, GREEDY, 0, draft_len=4, max_new_tokens=N,
                                      max_resumes=0).tokens)


def _open(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    """Open one Verify session and return the live call (its first reply read)."""
    spec = cloud_pb2.SessionSpec(session_id=uuid.uuid4().hex, prompt_tokens=PROMPT, max_new_tokens=N)
    requests: list[cloud_pb2.VerifyRequest] = [cloud_pb2.VerifyRequest(open=spec)]
    import queue

    q: queue.Queue = queue.Queue()
    q.put(requests[0])
    call = cloud_pb2_grpc.CloudVerifierStub(channel).Verify(iter(q.get, None), timeout=30)
    next(call)
    call.feed = q  # type: ignore[attr-defined]
    return call


def _code(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        _open(channel).cancel()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        assert "tdm_" not in (exc.details() or "")
        if exc.code() != grpc.StatusCode.UNAVAILABLE:  # the gateway's own refusals carry a request id
            assert re.search(r"\(request id [0-9a-f]{16}\)$", exc.details() or ""), exc.details()
        return exc.code()


def test_a_valid_token_over_tls_gives_the_targets_text(secure, store, pki, drafter, reference, tmp_path, counted):
    _, token = store.issue("phone")
    with cloud_channel(_edge(secure.port, pki, _token_file(tmp_path, token))) as channel:
        assert _speculative(drafter, channel) == reference
    assert counted.opened >= 1


def test_refused_calls_open_no_session(secure, store, pki, tmp_path, counted):
    before = counted.opened
    port = secure.port
    # plaintext against the TLS port: the handshake fails, nothing is forwarded
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert _code(channel) == grpc.StatusCode.UNAVAILABLE
    with cloud_channel(_edge(port, pki, None)) as channel:  # TLS, no token
        assert _code(channel) == grpc.StatusCode.UNAUTHENTICATED
    wrong = "tdm_" + "0" * 12 + "_" + "A" * 43
    with cloud_channel(_edge(port, pki, _token_file(tmp_path, wrong))) as channel:
        assert _code(channel) == grpc.StatusCode.UNAUTHENTICATED
    record, token = store.issue("tablet")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")  # right id, wrong secret
    with cloud_channel(_edge(port, pki, _token_file(tmp_path, forged))) as channel:
        assert _code(channel) == grpc.StatusCode.UNAUTHENTICATED
    store.revoke(record.id)
    time.sleep(1.1)  # the bound: the gateway re-reads a changed store at most RELOAD_S (1 s) later
    with cloud_channel(_edge(port, pki, _token_file(tmp_path, token))) as channel:
        assert _code(channel) == grpc.StatusCode.PERMISSION_DENIED
    assert counted.opened == before
    assert secure.gateway.denied["UNAUTHENTICATED"] == 3 and secure.gateway.denied["PERMISSION_DENIED"] == 1


def test_a_device_is_held_to_its_session_limit(secure, store, pki, tmp_path, counted):
    _, token = store.issue("laptop", max_sessions=2)
    with cloud_channel(_edge(secure.port, pki, _token_file(tmp_path, token))) as channel:
        first, second = _open(channel), _open(channel)
        opened = counted.opened
        assert _code(channel) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert counted.opened == opened
        first.feed.put(None)
        for _ in first:
            pass
        deadline = time.monotonic() + 5
        while secure.gateway.open_streams(store.records()[-1].id) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        third = _open(channel)  # a slot came free
        second.cancel()
        third.cancel()


def test_revocation_ends_open_streams(secure, store, pki, tmp_path):
    record, token = store.issue("watch")
    with cloud_channel(_edge(secure.port, pki, _token_file(tmp_path, token))) as channel:
        call = _open(channel)
        store.revoke(record.id)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert time.monotonic() - t0 < 2 * 1.0 + 1.0  # 2 * RELOAD_S, plus scheduling slack


def _revoked_mid_answer(store: TokenStore, record_id: str, fallback: bool, drafter: DrafterModel,
                        channel: grpc.Channel) -> tuple[list[tuple[int, ...]], object]:
    """A speculative answer whose token is revoked after its first verdict (the callback then
    waits out the gateway's reload); returns the pieces received and the result or the error."""
    pieces: list[tuple[int, ...]] = []

    def on_tokens(tokens, source) -> None:  # type: ignore[no-untyped-def]
        pieces.append(tuple(tokens))
        if len(pieces) == 1:
            store.revoke(record_id)
            time.sleep(2.1)  # > 2 x RELOAD_S: the gateway has ended the stream by now

    link = CloudLink(channel, SessionRequest(uuid.uuid4().hex, tuple(PROMPT), GREEDY, 0, N), round_timeout_s=10)
    try:
        return pieces, generate_speculative(drafter, link, PROMPT, GREEDY, 0, draft_len=4, max_new_tokens=N,
                                            max_resumes=3, fallback_local=fallback, on_tokens=on_tokens,
                                            pipeline=False)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return pieces, exc
    finally:
        assert link.resumes == 0, "a refused token is never resumed: a new stream is refused the same way"


def test_a_token_revoked_mid_answer_goes_on_on_the_device(secure, store, pki, drafter, tmp_path):
    record, token = store.issue("phone-revoked")
    with cloud_channel(_edge(secure.port, pki, _token_file(tmp_path, token))) as channel:
        pieces, result = _revoked_mid_answer(store, record.id, True, drafter, channel)
    assert not isinstance(result, Exception), result
    assert len(result.tokens) == N and [t for p in pieces for t in p] == list(result.tokens)
    [switch] = result.switches
    assert (switch.from_route, switch.to_route, switch.cause) == ("speculative", "local", SwitchCause.CLOUD_REFUSED)
    assert "PERMISSION_DENIED" in switch.reason and len(pieces[0]) <= switch.at_token < N


def test_a_token_revoked_mid_answer_without_fallback_fails_at_once_naming_it(secure, store, pki, drafter, tmp_path):
    record, token = store.issue("phone-revoked-2")
    with cloud_channel(_edge(secure.port, pki, _token_file(tmp_path, token))) as channel:
        _, result = _revoked_mid_answer(store, record.id, False, drafter, channel)
    assert isinstance(result, CredentialRefused) and result.code == grpc.StatusCode.PERMISSION_DENIED


def test_the_verifier_refuses_calls_that_bypass_the_gateway(tiny_models, pki):
    """A replica given the gateway's digest answers UNAUTHENTICATED to a call without the secret
    (the check `serve_app` runs), and the gateway's calls pass."""
    assert gw.replica_refusal((), gw.secret_digest("s3")) is not None
    assert gw.replica_refusal(((gw.GATEWAY_HEADER, "wrong"),), gw.secret_digest("s3")) is not None
    assert gw.replica_refusal(((gw.GATEWAY_HEADER, "s3"),), gw.secret_digest("s3")) is None
    assert gw.replica_refusal((), None) is None  # no gateway configured


def test_unsafe_settings_are_refused_before_anything_listens(pki, store, upstream, tmp_path):
    with pytest.raises(SecurityError, match="--insecure"):
        gw.build(GatewayConfig(host="0.0.0.0"), upstream, "s")
    with pytest.raises(SecurityError, match="credential"):
        gw.build(GatewayConfig(host="0.0.0.0", tls_cert=pki.server_cert, tls_key=pki.server_key), upstream, "s")
    gw.build(GatewayConfig(host="0.0.0.0", insecure=True), upstream, "s")  # asked for by name
    loose = tmp_path / "loose-token"
    loose.write_text("tdm_x")
    loose.chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        cloud_channel(EdgeConfig(cloud_address="127.0.0.1:1", cloud_token_file=loose))
    with pytest.raises(SecurityError, match="clear text"):
        cloud_channel(EdgeConfig(cloud_address="10.1.2.3:443", cloud_token_file=_token_file(tmp_path, "tdm_x")))


def test_mutual_tls_admits_only_devices_with_a_certificate(pki, store, upstream, drafter, reference, tmp_path):
    """With a client CA, a device without a certificate signed by it cannot finish the handshake;
    the development CA's client certificate gets the target's text."""
    config = GatewayConfig(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_cert,
                           tokens_file=store.path)
    _, token = store.issue("fleet-device")
    front = gw.InThread(gw.build(config, upstream, "gateway-secret"), "127.0.0.1:0")
    try:
        bare = _edge(front.port, pki, _token_file(tmp_path, token))
        with cloud_channel(bare) as channel:
            assert _code(channel) == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no client certificate
        fleet = EdgeConfig(cloud_address=f"127.0.0.1:{front.port}", cloud_ca_cert=pki.ca_cert,
                           cloud_client_cert=pki.client_cert, cloud_client_key=pki.client_key,
                           cloud_token_file=_token_file(tmp_path, token))
        with cloud_channel(fleet) as channel:
            assert _speculative(drafter, channel) == reference
    finally:
        front.stop()


def _ending(channel: grpc.Channel, messages: list[bytes]) -> tuple[grpc.StatusCode, str]:
    """Send all of `messages` on one Verify stream without waiting for replies; the status it ends with."""
    call = channel.stream_stream(f"/{gw.SERVICE_NAME}/Verify", request_serializer=None,
                                 response_deserializer=None)(iter(messages), timeout=60)
    try:
        for _ in call:
            pass
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), re.sub(r" \(request id [0-9a-f]{16}\)$", "", exc.details() or "")


def test_a_call_the_verifier_ends_while_requests_are_being_forwarded_keeps_its_status(upstream):
    """The verifier refuses an oversized prompt while the gateway is still forwarding the
    megabyte-sized rounds sent behind it. grpc.aio's client then replaces the verifier's status with
    INTERNAL "Internal error from Core" (its failed write) in most such calls; the edge must still
    read the verifier's own status. Seen in CI through Ray Serve's proxy, and reproduced here."""
    big = [7] * 300_000  # ~1.5 MB on the wire, under the 4 MB message limit
    messages = [cloud_pb2.VerifyRequest(open=cloud_pb2.SessionSpec(prompt_tokens=big, max_new_tokens=4))]
    messages += [cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(round=i, draft_tokens=big)) for i in range(4)]
    raw = [m.SerializeToString() for m in messages]
    with grpc.insecure_channel(upstream) as direct:
        expected = _ending(direct, raw)
    assert expected[0] in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT), expected
    front = gw.InThread(gw.build(GatewayConfig(), upstream, "gateway-secret"), "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            seen = Counter(_ending(channel, raw) for _ in range(30))
    finally:
        front.stop()
    assert seen == Counter({expected: 30}), seen
