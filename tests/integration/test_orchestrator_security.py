"""The orchestrator's transport security: TLS on both listeners, the API key on every gRPC call but
health and on every HTTP request, TLS and a key toward the edge, TLS toward the cloud's health,
and the bind rule of the real process.

The orchestrator is the real one (core, gRPC servicer, HTTP endpoint) over `FakeEdge`
(`tests/support/orch_stack`), on real sockets, with certificates from the development CA
(`tandem.ops.devpki`). No test may show a key in a reply, an error, stdout, stderr or a log line:
every one of them is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import logging
import os
import ssl
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.cli import add_orchestrator_parser
from orchestrator.config import OrchestratorConfig
from tandem.ops import devpki
from tandem.security import AioKeyInterceptor, ServerTls, add_port, write_secret
from tandem_sdk import AsyncClient, AuthenticationError, Client, Unavailable
from tests.support.orch_stack import FakeEdge, FakeStack, InThread, LoopThread, fake_edge_stack

KEY = "tk-orch-3f9a1c7e5b2d48a6-Secret"
EDGE_KEY = "tk-edge-8b1d0e4c2a6f4e19-Secret"
WRONG = "tk-wrong-0000000000000000"
SECRETS = (KEY, EDGE_KEY, WRONG)
ROOT = Path(__file__).resolve().parents[2]


def _no_secret(*texts: object) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in str(text), "a key leaked"


@pytest.fixture(scope="module")
def log_records() -> Iterator[list[logging.LogRecord]]:
    """Every log record of this module's tests, at every level; none may hold a key."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root, handler = logging.getLogger(), Keep(logging.DEBUG)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    _no_secret(*(r.getMessage() for r in records), *(r.exc_text or "" for r in records))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> devpki.DevPki:
    return devpki.ensure(tmp_path_factory.mktemp("security") / "pki")


@pytest.fixture(scope="module")
def key_file(pki: devpki.DevPki) -> Path:
    return write_secret(pki.folder.parent / "api-key", KEY + "\n")


@pytest.fixture(scope="module")
def secure(pki: devpki.DevPki, key_file: Path, log_records: list[logging.LogRecord]) -> Iterator[FakeStack]:
    """The orchestrator with TLS on both listeners and an API key, over the plain fake edge."""
    with fake_edge_stack(tls_cert=pki.server_cert, tls_key=pki.server_key, api_key_file=key_file) as s:
        yield s


def _ca_context(pki: devpki.DevPki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_cert))


def _https(stack: FakeStack, pki: devpki.DevPki, method: str, path: str, headers: dict[str, str] | None = None,
           body: bytes | None = None) -> tuple[int, Any, http.client.HTTPMessage]:
    conn = http.client.HTTPSConnection("127.0.0.1", stack.orchestrator.running.http_port, timeout=10,
                                       context=_ca_context(pki))
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        _no_secret(raw, resp.headers)
        return resp.status, json.loads(raw), resp.headers
    finally:
        conn.close()


# --- HTTP --------------------------------------------------------------------------------------


CHAT = json.dumps({"model": "tandem-local", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/models", None), ("GET", "/v1/models/tandem", None), ("GET", "/openapi.json", None),
    ("POST", "/v1/chat/completions", CHAT), ("POST", "/v1/completions", b"{}"), ("GET", "/no/such/route", None),
    ("DELETE", "/v1/models", None),
])
@pytest.mark.parametrize("auth", [None, f"Bearer {WRONG}", f"Basic {KEY}", "Bearer ", KEY, f"Bearer {KEY}x"])
def test_http_without_the_key_is_401_in_openai_s_shape(secure: FakeStack, pki: devpki.DevPki, method: str,
                                                       path: str, body: bytes | None, auth: str | None) -> None:
    opened = secure.edge.opened
    status, reply, headers = _https(secure, pki, method, path, {"Authorization": auth} if auth else None, body)
    assert status == 401
    assert headers["WWW-Authenticate"] == "Bearer"
    assert list(reply) == ["error"] and list(reply["error"]) == ["message", "type", "param", "code"]
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["param"] is None and reply["error"]["code"] == "invalid_api_key"
    assert reply["error"]["message"]
    assert secure.edge.opened == opened  # a refused generation never reaches the edge


def test_http_with_the_key_over_tls_serves_every_route(secure: FakeStack, pki: devpki.DevPki) -> None:
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert _https(secure, pki, "GET", "/v1/models", bearer)[0] == 200
    assert _https(secure, pki, "GET", "/openapi.json", bearer)[0] == 200
    status, reply, _ = _https(secure, pki, "GET", "/no/such/route", bearer)
    assert status == 404 and reply["error"]["code"] == "unknown_url"  # past the key, the usual errors


def test_the_openai_client_works_over_tls_with_the_key(secure: FakeStack, pki: devpki.DevPki) -> None:
    url = f"https://127.0.0.1:{secure.orchestrator.running.http_port}/v1"
    with httpx2.Client(verify=_ca_context(pki)) as http_client:
        client = openai.OpenAI(base_url=url, api_key=KEY, http_client=http_client, max_retries=0, timeout=30)
        assert "tandem" in [m.id for m in client.models.list()]
        chat = client.chat.completions.create(model="tandem-local", max_tokens=3,
                                              messages=[{"role": "user", "content": "Say hi."}])
        assert chat.choices[0].message.content == "w0 w1 w2 "
        stream = client.chat.completions.create(model="tandem-local", max_tokens=2, stream=True,
                                                messages=[{"role": "user", "content": "Say hi."}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "w0 w1 "
        wrong = openai.OpenAI(base_url=url, api_key=WRONG, http_client=http_client, max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    _no_secret(info.value, info.value.body)


def test_plain_http_to_the_tls_port_gets_nothing(secure: FakeStack) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", secure.orchestrator.running.http_port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, OSError)):
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            conn.getresponse().read()
    finally:
        conn.close()


def test_https_with_an_untrusted_certificate_fails(secure: FakeStack) -> None:
    conn = http.client.HTTPSConnection("127.0.0.1", secure.orchestrator.running.http_port, timeout=10,
                                       context=ssl.create_default_context())  # the system's CAs only
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            conn.request("GET", "/v1/models")
    finally:
        conn.close()


# --- gRPC --------------------------------------------------------------------------------------


def test_grpc_without_the_key_is_unauthenticated(secure: FakeStack, pki: devpki.DevPki) -> None:
    address, opened = secure.orchestrator.grpc_address, secure.edge.opened
    for api_key, hint in ((None, "missing credential"), (WRONG, "invalid API key")):
        with Client(address, ca_cert=pki.ca_cert, api_key=api_key, retries=0, timeout_s=10) as client:
            with pytest.raises(AuthenticationError) as info:
                client.status()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and hint in info.value.details
            _no_secret(info.value)
            with pytest.raises(AuthenticationError):
                client.complete(prompt="hi", max_new_tokens=2, route="local")
    assert secure.edge.opened == opened


def test_grpc_with_the_key_and_the_ca_works(secure: FakeStack, pki: devpki.DevPki) -> None:
    address = secure.orchestrator.grpc_address
    opened = secure.edge.opened
    with Client(address, api_key=KEY, ca_cert=pki.ca_cert, retries=0, timeout_s=10) as client:
        assert client.tls
        assert client.status().edge_healthy
        result = client.complete(prompt="hi", max_new_tokens=3, route="local")
    assert result.text == "w0 w1 w2 " and secure.edge.opened == opened + 1
    with Client(address, api_key=KEY, ca_cert=pki.ca_cert.read_bytes(), server_name="localhost") as client:
        assert client.status().edge_healthy  # PEM bytes, and another name the certificate holds

    async def use_async() -> str:
        async with AsyncClient(address, api_key=KEY, ca_cert=str(pki.ca_cert), retries=0, timeout_s=10) as aclient:
            assert (await aclient.status()).edge_healthy
            return (await aclient.complete(prompt="hi", max_new_tokens=2, route="local")).text

    assert asyncio.run(use_async()) == "w0 w1 "


def test_plaintext_or_an_untrusted_ca_cannot_reach_the_tls_port(secure: FakeStack, pki: devpki.DevPki) -> None:
    address = secure.orchestrator.grpc_address
    untrusted: list[dict[str, Any]] = [
        {},  # plaintext
        {"tls": True},  # the system's CAs do not know the development CA
        {"ca_cert": pki.ca_cert, "server_name": "not-in-the-cert.example"},  # the right CA, the wrong name
    ]
    for kwargs in untrusted:
        with Client(address, retries=0, timeout_s=3, **kwargs) as client, pytest.raises(Unavailable):
            client.status()


def test_health_needs_no_key(secure: FakeStack, pki: devpki.DevPki) -> None:
    credentials = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
    with grpc.secure_channel(secure.orchestrator.grpc_address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tandem.v1.Orchestrator"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_sdk_arguments_are_checked_without_echoing_the_key(tmp_path: Path) -> None:
    for bad in (f"{KEY} with spaces", f"{KEY}\x00", f"{KEY}é", "   "):
        with pytest.raises(ValueError, match="api_key") as info:
            Client("127.0.0.1:1", api_key=bad)
        _no_secret(info.value)
    with pytest.raises(ValueError, match="ca_cert: cannot read"):
        Client("127.0.0.1:1", ca_cert=tmp_path / "absent.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="ca_cert: not a PEM certificate"):
        Client("127.0.0.1:1", ca_cert=tmp_path / "junk.pem")
    with pytest.raises(ValueError, match="server_name: only applies over TLS"):
        Client("127.0.0.1:1", server_name="localhost")
    with Client("127.0.0.1:1", api_key=KEY) as client:
        _no_secret(repr(client), repr(vars(client).get("policy")))
        assert not client.tls


def test_a_key_without_tls_on_loopback_travels_as_metadata(key_file: Path, log_records: list[logging.LogRecord]
                                                            ) -> None:
    with fake_edge_stack(api_key_file=key_file) as plain:
        address = plain.orchestrator.grpc_address
        with Client(address, api_key=KEY, retries=0, timeout_s=10) as client:
            assert not client.tls and client.status().edge_healthy
            assert client.complete(prompt="hi", max_new_tokens=2, route="local").text == "w0 w1 "
        with Client(address, retries=0, timeout_s=10) as client, pytest.raises(AuthenticationError):
            client.status()

        async def use_async() -> str:
            async with AsyncClient(address, api_key=KEY, retries=0, timeout_s=10) as aclient:
                return (await aclient.complete(prompt="hi", max_new_tokens=2, route="local")).text

        assert asyncio.run(use_async()) == "w0 w1 "
        conn = http.client.HTTPConnection("127.0.0.1", plain.orchestrator.running.http_port, timeout=10)
        try:
            for auth, status in ((None, 401), (f"Bearer {KEY}", 200)):
                conn.request("GET", "/v1/models", headers={"Authorization": auth} if auth else {})
                resp = conn.getresponse()
                _no_secret(resp.read())
                assert resp.status == status
        finally:
            conn.close()


def _read(capsys: pytest.CaptureFixture[str]) -> Any:
    captured = capsys.readouterr()
    _no_secret(captured.out, captured.err)
    return captured


def test_the_client_commands_take_a_key_file_or_the_environment(
        secure: FakeStack, pki: devpki.DevPki, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from tandem.cli.main import main

    monkeypatch.delenv("TANDEM_API_KEY", raising=False)
    base = ["generate", "--address", secure.orchestrator.grpc_address, "--route", "local", "--max-new-tokens", "2"]
    assert main([*base, "--ca-cert", str(pki.ca_cert), "--api-key-file", str(key_file), "hi"]) == 0
    assert _read(capsys).out == "w0 w1 \n"
    assert main([*base, "--ca-cert", str(pki.ca_cert), "hi"]) == 2
    err = _read(capsys).err
    assert "refused the request" in err and "--api-key-file" in err and len(err.strip().splitlines()) == 1
    loose = tmp_path / "loose"
    loose.write_text(KEY)
    loose.chmod(0o644)
    assert main([*base, "--ca-cert", str(pki.ca_cert), "--api-key-file", str(loose), "hi"]) == 2
    assert "chmod 600" in _read(capsys).err
    monkeypatch.setenv("TANDEM_API_KEY", KEY)
    assert main([*base, "--ca-cert", str(pki.ca_cert), "hi"]) == 0
    assert _read(capsys).out == "w0 w1 \n"
    assert main([*base, "hi"]) == 2  # plaintext to the TLS port
    err = _read(capsys).err
    assert "unavailable" in err and "--ca-cert" in err


# --- the edge hop and the cloud probe ----------------------------------------------------------


async def _serve_secure_edge(edge: FakeEdge, tls: ServerTls, key: str) -> tuple[grpc.aio.Server, int]:
    """`FakeEdge` over TLS with an API key (health exempt): the edge and the probed cloud at once."""
    from grpc_health.v1 import health

    from protos.tandem.v1 import edge_pb2_grpc

    server = grpc.aio.server(interceptors=[AioKeyInterceptor(key)])
    edge_pb2_grpc.add_EdgeNodeServicer_to_server(edge, server)  # type: ignore[arg-type]
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = add_port(server, "127.0.0.1:0", tls)
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


@contextlib.contextmanager
def _secure_edge(pki: devpki.DevPki) -> Iterator[tuple[FakeEdge, str]]:
    edge, loop = FakeEdge(), LoopThread("secure-edge-loop")
    try:
        server, port = loop.run(_serve_secure_edge(edge, ServerTls(pki.server_cert, pki.server_key), EDGE_KEY))
        try:
            yield edge, f"127.0.0.1:{port}"
        finally:
            loop.run(server.stop(None))
    finally:
        loop.stop()


def _orchestrator(edge_address: str, **config: Any) -> InThread:
    return InThread(OrchestratorConfig(edge_address=edge_address, cloud_address=edge_address, grpc_port=0,
                                       http_port=-1, personal=False, health_interval_s=0.2, probe_timeout_s=2,
                                       circuit_open_s=0.5, **config))


def _wait_link_up(orch: InThread) -> None:
    assert orch.running.core is not None
    deadline = time.monotonic() + 15
    while orch.running.core.monitor.snapshot().state != "up":
        assert time.monotonic() < deadline, "the link never came up over TLS"
        time.sleep(0.02)


def test_the_edge_hop_uses_tls_and_the_edge_key(pki: devpki.DevPki, log_records: list[logging.LogRecord]) -> None:
    edge_key_file = write_secret(pki.folder.parent / "edge-key", EDGE_KEY)
    with _secure_edge(pki) as (edge, address):
        orch = _orchestrator(address, edge_ca_cert=pki.ca_cert, edge_api_key_file=edge_key_file,
                             cloud_ca_cert=pki.ca_cert)
        try:
            _wait_link_up(orch)  # the health probe: TLS to the "cloud", no key needed
            with Client(orch.grpc_address, retries=0, timeout_s=10) as client:  # loopback, no key of its own
                result = client.complete(prompt="hi", max_new_tokens=2, route="speculative")
                assert client.status().edge_healthy
        finally:
            orch.stop()
        assert result.text == "w0 w1 " and result.stats is not None and result.stats.route == "speculative"
        assert edge.opened == 1

        keyless = _orchestrator(address, edge_ca_cert=pki.ca_cert, cloud_tls=True, cloud_ca_cert=pki.ca_cert)
        try:
            _wait_link_up(keyless)
            with Client(keyless.grpc_address, retries=0, timeout_s=10) as client, \
                    pytest.raises(Unavailable, match="UNAUTHENTICATED"):
                client.complete(prompt="hi", max_new_tokens=2, route="local")
        finally:
            keyless.stop()
        assert edge.opened == 1


# --- the real process --------------------------------------------------------------------------


def _serve(*argv: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tandem", "serve", "orchestrator", "--edge", "127.0.0.1:1",
                           "--port", "0", "--http-port", "-1", "--no-personal", *argv],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def _one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    _no_secret(proc.stdout, proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_a_non_loopback_host_without_tls_and_key_exits_2() -> None:
    t0 = time.monotonic()
    line = _one_line_error(_serve("--host", "0.0.0.0"), "0.0.0.0", "TLS", "--insecure", "--api-key-file")
    assert line.startswith("tandem serve: error: orchestrator: refusing to listen on 0.0.0.0")
    assert time.monotonic() - t0 < 20  # nothing heavy is loaded first
    _one_line_error(_serve("--host", "0.0.0.0", env={"TANDEM_ORCH_API_KEY": KEY}), "without TLS")


def test_a_non_loopback_edge_without_tls_exits_2_unless_insecure() -> None:
    """Prompts, answers and the edge's API key would cross the network in clear text."""
    line = _one_line_error(_serve("--edge", "192.0.2.1:7071"), "192.0.2.1:7071", "TLS", "--edge-ca-cert",
                           "--insecure")
    assert "clear text" in line
    from orchestrator.config import resolve_security

    assert resolve_security(OrchestratorConfig(edge_address="192.0.2.1:7071", insecure=True), {}).edge_tls is None
    assert resolve_security(OrchestratorConfig(edge_address="[::1]:7071"), {}).edge_tls is None  # loopback: allowed


def test_an_unsafe_key_file_or_a_missing_certificate_exits_2(tmp_path: Path, pki: devpki.DevPki) -> None:
    loose = tmp_path / "loose-key"
    loose.write_text(KEY)
    loose.chmod(0o644)
    _one_line_error(_serve("--api-key-file", str(loose)), "api key", str(loose), "644", "chmod 600")
    empty = write_secret(tmp_path / "empty-key", "\n")
    _one_line_error(_serve("--api-key-file", str(empty)), "is empty")
    _one_line_error(_serve("--tls-cert", str(tmp_path / "absent.pem"), "--tls-key", str(pki.server_key)),
                    "tls_cert", "absent.pem")
    _one_line_error(_serve("--tls-cert", str(pki.server_cert)), "tls_key")
    _one_line_error(_serve("--tls-cert", str(pki.ca_cert), "--tls-key", str(pki.server_key)), "tls_cert/tls_key")
    _one_line_error(_serve("--edge-ca-cert", str(tmp_path / "absent.pem")), "edge_ca_cert")


def test_a_key_on_the_command_line_is_refused_without_echo() -> None:
    for flag in ("--api-key", "--edge-api-key"):
        for argv in ((flag, KEY), (f"{flag}={KEY}",)):
            proc = _serve(*argv)
            _no_secret(proc.stdout, proc.stderr)
            assert proc.returncode == 2 and "never goes on the command line" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tandem", "generate", "--api-key", KEY, "hi"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    _no_secret(proc.stdout, proc.stderr)
    assert proc.returncode == 2 and "never goes on the command line" in proc.stderr


def _start_and_stop(*argv: str, env: dict[str, str]) -> tuple[str, str]:
    """Start the real orchestrator, wait for its address line, SIGTERM it; (stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "tandem", "serve", "orchestrator", "--edge", "127.0.0.1:1",
                             "--port", "0", "--http-port", "0", "--no-personal", "--drain-s", "1", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **env})
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # blocks until the listeners are up (or the process died)
        assert first.startswith("orchestrator grpc=0.0.0.0:"), first
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    return first + out, err


def test_insecure_allows_a_non_loopback_host_with_a_warning(pki: devpki.DevPki, key_file: Path) -> None:
    out, err = _start_and_stop("--host", "0.0.0.0", "--insecure", env={"TANDEM_ORCH_API_KEY": KEY})
    _no_secret(out, err)
    warnings = [line for line in err.splitlines() if "WARNING" in line and "INSECURE" in line]
    assert len(warnings) == 1 and "without TLS" in warnings[0] and "0.0.0.0" in warnings[0], err
    out, err = _start_and_stop("--host", "0.0.0.0", "--tls-cert", str(pki.server_cert), "--tls-key",
                               str(pki.server_key), "--api-key-file", str(key_file), env={})
    _no_secret(out, err)
    assert "INSECURE" not in err and "https://0.0.0.0:" in err


# --- no secret on the command line -------------------------------------------------------------


def test_no_flag_or_config_field_takes_a_secret_value() -> None:
    hints = typing.get_type_hints(OrchestratorConfig)
    secretish = {"key", "token", "secret", "password", "credential"}
    for f in dataclasses.fields(OrchestratorConfig):
        if secretish & set(f.name.split("_")):
            assert hints[f.name] == Path | None, f"{f.name} must name a file, never hold the secret"
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    orch = add_orchestrator_parser(sub)
    from tandem.cli import client as client_cli

    client_cli.add_parser(sub)
    for p in (orch, sub.choices["generate"], sub.choices["chat"], sub.choices["docs"]._subparsers._group_actions[0]
              .choices["list"]):
        for action in p._actions:
            names = " ".join(action.option_strings)
            if secretish & set(names.replace("--", " ").replace("-", " ").split()):
                refused = type(action).__name__ == "RefuseSecret"
                assert refused or action.type is Path, f"{names} would take a secret on the command line"
