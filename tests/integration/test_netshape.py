"""The link shaper end to end on loopback: an echo server and a tiny gRPC server behind it, the
shaper in a background thread, the control endpoint, and `python -m netshape` as a subprocess.

Timing checks are lower bounds only (the delay model guarantees them); upper bounds are a few
seconds, so a loaded machine cannot fail them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import queue
import random
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from netshape import LinkConditions, LinkShaper, ShaperControl, format_address, parse_address

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
CLOSED = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server.server_address[:2]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def shaper(echo: tuple[str, int]) -> Iterator[LinkShaper]:
    with LinkShaper(echo, seed=1, control=("127.0.0.1", 0)) as running:
        yield running


def _connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=5)


def _round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    start = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "closed mid-reply"
        got += chunk
    assert got == payload
    return time.monotonic() - start


def _closed_promptly(sock: socket.socket) -> bool:
    """True when the peer closes or resets within 3 s (a send may be needed to see the RST)."""
    sock.settimeout(3)
    try:
        return sock.recv(1) == b""
    except CLOSED:
        return True
    except TimeoutError:
        return False


def _refused_or_closed(address: tuple[str, int]) -> bool:
    try:
        with _connect(address) as sock:
            return _closed_promptly(sock)
    except (ConnectionRefusedError, *CLOSED):  # the reset can beat connect() back
        return True


def test_bytes_arrive_intact_and_in_order_with_jitter(shaper: LinkShaper) -> None:
    shaper.set_conditions(rtt_ms=4, jitter_ms=3)
    rng = random.Random(3)
    chunks = [rng.randbytes(rng.randint(1, 100_000)) for _ in range(60)]  # about 3 MB
    sent = hashlib.sha256(b"".join(chunks)).hexdigest()
    with _connect(shaper.address) as sock:
        def send() -> None:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = hashlib.sha256()
        while data := sock.recv(1 << 16):
            received.update(data)
        sender.join(5)
    assert received.hexdigest() == sent
    stats = shaper.stats()
    total = sum(map(len, chunks))
    assert stats.bytes_up == total and stats.bytes_down == total


def test_rtt_adds_at_least_the_configured_delay(shaper: LinkShaper) -> None:
    with _connect(shaper.address) as sock:
        _round_trip(sock)
        shaper.set_conditions(rtt_ms=200)
        assert _round_trip(sock) >= 0.18


def test_bandwidth_limit_bounds_transfer_time(shaper: LinkShaper) -> None:
    shaper.set_conditions(bandwidth_kbps=800)  # 100 KB/s each way
    payload = random.Random(4).randbytes(40_000)
    with _connect(shaper.address) as sock:
        assert _round_trip(sock, payload) >= 0.4 * 0.95  # 40 KB at 100 KB/s, each way pipelined


def test_drop_connections_resets_and_new_ones_work(shaper: LinkShaper) -> None:
    with _connect(shaper.address) as sock:
        _round_trip(sock)
        assert shaper.drop_connections() == 1
        assert _closed_promptly(sock)
    with _connect(shaper.address) as sock:
        _round_trip(sock)
    stats = shaper.stats()
    assert stats.connections_dropped == 1 and stats.connections_accepted == 2


def test_blackhole_stalls_then_up_drops_and_new_ones_work(shaper: LinkShaper) -> None:
    with _connect(shaper.address) as before:
        _round_trip(before)
        shaper.set_conditions(mode="blackhole")
        with _connect(shaper.address) as during:
            for sock in (before, during):
                sock.sendall(b"anyone there?")
                sock.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    sock.recv(1)
            assert shaper.stats().bytes_blackholed >= 2 * len(b"anyone there?")
            shaper.set_conditions(mode="up")  # stalled connections are dropped, not resumed
            assert _closed_promptly(before) and _closed_promptly(during)
    with _connect(shaper.address) as sock:
        _round_trip(sock)


def test_down_refuses_new_and_drops_live(shaper: LinkShaper) -> None:
    with _connect(shaper.address) as live:
        _round_trip(live)
        shaper.set_conditions(mode="down")
        assert _closed_promptly(live)
    assert _refused_or_closed(shaper.address)
    assert shaper.stats().connections_refused <= 1
    shaper.set_conditions(mode="up")
    with _connect(shaper.address) as sock:
        _round_trip(sock)


def test_control_endpoint(shaper: LinkShaper) -> None:
    assert shaper.control_address is not None
    control = ShaperControl(shaper.control_address)
    assert control.conditions() == LinkConditions()
    assert control.set(rtt_ms=120, jitter_ms=1) == LinkConditions(rtt_ms=120, jitter_ms=1)
    assert shaper.conditions.rtt_ms == 120
    with _connect(shaper.address) as sock:
        assert _round_trip(sock, b"x" * 10) >= 0.1
        assert control.drop() == 1
    stats = control.stats()
    assert (stats.bytes_up, stats.bytes_down, stats.connections_dropped) == (10, 10, 1)
    with pytest.raises(ValueError, match="rtt_ms"):
        control.set(rtt_ms=-1)
    with pytest.raises(ValueError, match="bogus"):
        control.set(bogus=1)
    with pytest.raises(ValueError, match="loopback"):
        ShaperControl("192.0.2.1:80")


# --- malformed control requests: a clear 4xx JSON reply, never a 500 -------------------------

_JSON = {"Content-Type": "application/json"}


def _request(address: tuple[str, int], method: str, path: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict[str, object]]:
    """One request on its own connection; returns (status, headers, JSON body)."""
    conn = http.client.HTTPConnection(*address, timeout=5)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        assert response.getheader("Content-Type", "").startswith("application/json")
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize("method, path, body, headers, status, message", [
    ("POST", "/conditions", b"{rtt_ms: 1", _JSON, 400, "body is not JSON"),
    ("POST", "/conditions", b"\xff\xfe", _JSON, 400, "body is not JSON"),
    ("POST", "/conditions", b"[1, 2]", _JSON, 400, "JSON object"),
    ("POST", "/conditions", b'{"bogus": 1}', _JSON, 400, "bogus: not a LinkConditions field"),
    ("POST", "/conditions", b'{"conditions": {}}', _JSON, 400, "conditions: not a"),
    ("POST", "/conditions", b'{"rtt_ms": "20"}', _JSON, 400, "rtt_ms: expected a number"),
    ("POST", "/conditions", b'{"jitter_ms": null}', _JSON, 400, "jitter_ms: expected a number"),
    ("POST", "/conditions", b'{"rtt_ms": NaN}', _JSON, 400, "rtt_ms: must be finite"),
    ("POST", "/conditions", b'{"rtt_ms": 1e400}', _JSON, 400, "rtt_ms: must be finite"),
    ("POST", "/conditions", b'{"bandwidth_kbps": 1' + b"0" * 400 + b"}", _JSON, 400,
     "bandwidth_kbps: must be finite"),
    ("POST", "/conditions", b'{"mode": ["up"]}', _JSON, 400, "mode: must be one of"),
    ("POST", "/conditions", b'{"rtt_ms": 5}', {"Content-Type": "text/plain"}, 415,
     "application/json"),
    ("POST", "/conditions", b'{"rtt_ms": 5}', {}, 415, "application/json"),
    ("POST", "/conditions", b"{" + b" " * 70_000 + b"}", _JSON, 413, "too large"),
    ("POST", "/drop", b'{"all": true}', _JSON, 400, "all: /drop takes no fields"),
    ("GET", "/nowhere", b"", {}, 404, "no such endpoint '/nowhere'"),
    ("GET", "/", b"", {}, 404, "no such endpoint"),
    ("DELETE", "/conditions", b"", {}, 405, "/conditions takes GET or POST, not DELETE"),
    ("GET", "/drop", b"", {}, 405, "/drop takes POST"),
    ("PUT", "/stats", b"{}", _JSON, 405, "/stats takes GET"),
    ("GET", "/stats", b"", {"Host": "attacker.example:80"}, 403, "loopback"),
])
def test_control_refuses_malformed_requests_with_json_4xx(
        shaper: LinkShaper, method: str, path: str, body: bytes, headers: dict[str, str],
        status: int, message: str) -> None:
    assert shaper.control_address is not None
    shaper.set_conditions(rtt_ms=7)
    got, reply_headers, reply = _request(shaper.control_address, method, path, body, headers)
    assert (got, message in str(reply.get("error"))) == (status, True), reply
    if status == 405:
        assert reply_headers.get("Allow")
    assert shaper.conditions == LinkConditions(rtt_ms=7), "a refused request changes nothing"
    assert ShaperControl(shaper.control_address).stats().connections_dropped == 0


def test_control_accepts_an_empty_body_and_survives_garbage(shaper: LinkShaper) -> None:
    address = shaper.control_address
    assert address is not None
    assert _request(address, "POST", "/conditions", b"", _JSON)[0] == 200  # changes nothing
    assert _request(address, "POST", "/drop", b"", _JSON)[2] == {"dropped": 0}
    with socket.create_connection(address, timeout=5) as sock:  # not HTTP at all
        sock.sendall(b"\x16\x03\x01 hello\r\n\r\n")
        assert sock.recv(65536).split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    assert ShaperControl(address).set(rtt_ms=3).rtt_ms == 3


def test_control_endpoint_binds_loopback_only(echo: tuple[str, int]) -> None:
    with pytest.raises(ValueError, match="loopback"), LinkShaper(echo, control=("0.0.0.0", 0)):
        pass


def test_in_the_callers_event_loop(echo: tuple[str, int]) -> None:
    async def scenario() -> float:
        shaper = LinkShaper(echo, LinkConditions(rtt_ms=100))
        await shaper.start()
        try:
            reader, writer = await asyncio.open_connection(*shaper.address)
            start = time.monotonic()
            writer.write(b"hi")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
            elapsed = time.monotonic() - start
            assert shaper.drop_connections() == 1  # called on the loop itself: runs inline
            with contextlib.suppress(*CLOSED):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            return elapsed
        finally:
            await shaper.aclose()

    assert asyncio.run(scenario()) >= 0.09


def test_unreachable_upstream_resets_the_client() -> None:
    with socket.socket() as unused:  # a loopback port with nothing listening
        unused.bind(("127.0.0.1", 0))
        upstream = unused.getsockname()
    with LinkShaper(upstream) as shaper:
        assert _refused_or_closed(shaper.address)


# --- real gRPC through the shaper ------------------------------------------------------------

_METHOD = "/netshape.test.Echo/Echo"


@pytest.fixture(scope="module")
def grpc_echo() -> Iterator[tuple[str, int]]:
    handler = grpc.method_handlers_generic_handler(
        "netshape.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield "127.0.0.1", port
    server.stop(grace=None).wait(5)


def _works_or_unavailable(echo: grpc.UnaryUnaryMultiCallable, payload: bytes) -> None:
    """After a drop, a call on the old channel reconnects or fails fast, never hangs."""
    start = time.monotonic()
    try:
        assert echo(payload, timeout=3) == payload
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 4.5


def test_grpc_through_the_shaper(grpc_echo: tuple[str, int]) -> None:
    with LinkShaper(grpc_echo, LinkConditions(rtt_ms=20, jitter_ms=5), seed=2) as shaper:
        target = format_address(shaper.address)
        options = [("grpc.enable_http_proxy", 0)]
        # gRPC may try a dead transport more than once after a reset, so each phase that needs
        # a healthy connection starts on a fresh channel rather than waiting for a reconnect.
        with grpc.insecure_channel(target, options=options) as channel:
            echo = channel.unary_unary(_METHOD)
            assert echo(b"hello", timeout=5) == b"hello"
            assert shaper.drop_connections() >= 1
            _works_or_unavailable(echo, b"again")

        with grpc.insecure_channel(target, options=options) as channel:
            echo = channel.unary_unary(_METHOD)
            assert echo(b"warm", timeout=5) == b"warm"
            shaper.set_conditions(mode="blackhole")
            with pytest.raises(grpc.RpcError) as failed:
                echo(b"lost", timeout=1)
            assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            shaper.set_conditions(mode="up")  # drops the stalled connection
            _works_or_unavailable(echo, b"back")

        with grpc.insecure_channel(target, options=options) as channel:
            assert channel.unary_unary(_METHOD)(b"fresh", timeout=5) == b"fresh"


# --- python -m netshape as a process ---------------------------------------------------------


def _read_lines(stream: object, lines: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line.strip())


def test_cli_process(echo: tuple[str, int]) -> None:
    argv = [sys.executable, "-m", "netshape", "--listen", "127.0.0.1:0",
            "--upstream", f"{echo[0]}:{echo[1]}", "--rtt-ms", "20", "--jitter-ms", "5",
            "--bandwidth-kbps", "0", "--control", "127.0.0.1:0"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
        printed = dict(lines.get(timeout=10).split("=", 1) for _ in range(2))
        listen, control = parse_address(printed["listen"]), ShaperControl(printed["control"])
        with _connect(listen) as sock:
            assert _round_trip(sock) >= 0.01  # 20 ms less 5 ms jitter each way
            control.set(rtt_ms=150, jitter_ms=0)
            assert _round_trip(sock) >= 0.14
        assert control.stats().bytes_up == 8
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
