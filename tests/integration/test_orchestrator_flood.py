"""Floods and leaks: the orchestrator after thousands of sessions, abandoned streams, cancelled
opens, connection churn and slow HTTP clients is as it was before.

The orchestrator is the real one (gRPC service, OpenAI endpoint, core) over a fake edge node
that streams 16 one-token deltas 1 ms apart (`tests/support/orch_stack.FakeEdge`), all on
127.0.0.1 in this process. A second HTTP listener over the same core is started with short
slow-client timeouts (header 1 s, body 1 s) so the slowloris phase ends quickly; the
production defaults are 10 s and 30 s (`orchestrator.http_api`).

Phases (bounded counts, each with a time limit; the whole test takes about a minute on 2 cores):
1. SESSIONS Generate calls read to the end, CONCURRENCY at once (the orchestrator's
   max_concurrent: a few are still refused RESOURCE_EXHAUSTED, when a call arrives before the
   previous answer's slot is freed);
2. ABANDONED streams cancelled after their first two messages;
3. CANCELLED calls cancelled while opening (right after the call starts, or with a 2 ms deadline);
4. BURST calls 4 x CONCURRENCY at once: the ones over max_concurrent are refused at once;
5. CHANNELS channels each opened for one Status call and closed;
6. HTTP: HTTP_REQUESTS completions, half streamed and dropped after the first event; then
   SLOWLORIS connections trickling a request head one header every 200 ms and SLOW_BODIES sending
   a body one byte every 200 ms, while a normal request must still be served quickly.

Afterwards: no generation running (the orchestrator's count and the edge's), file descriptors
back to the baseline (+ FD_SLACK), RSS growth under RSS_GROWTH_MB, and a normal request's p95
latency at most max(3x, +50 ms) of before: a leak check, not a speed test. The figures are
printed (`-s`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from orchestrator.http_api import create_http_app, start_http
from protos.tandem.v1 import orchestrator_pb2 as opb
from protos.tandem.v1 import orchestrator_pb2_grpc
from tests.support.orch_stack import FakeStack, fake_edge_stack

SESSIONS, ABANDONED, CANCELLED, BURST, CHANNELS = 2000, 500, 500, 300, 200
HTTP_REQUESTS, SLOWLORIS, SLOW_BODIES = 300, 50, 20
CONCURRENCY = 4  # the orchestrator's max_concurrent (the default); BURST runs 4x as many at once
FD_SLACK = 8
RSS_GROWTH_MB = 64
HEADER_TIMEOUT_S = BODY_TIMEOUT_S = 1.0
REQUEST = opb.GenerateTextRequest(prompt="def add(a, b):", options=opb.GenerateOptions(
    route=opb.ROUTE_LOCAL, max_new_tokens=16))


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class RssPeak:
    """Samples RSS every 50 ms in a thread; `peak` is the largest seen."""

    def __init__(self) -> None:
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def p95_ms(stub: orchestrator_pb2_grpc.OrchestratorStub, n: int = 40) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert list(stub.Generate(REQUEST, timeout=30))[-1].WhichOneof("kind") == "stats"
        times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[int(0.95 * (n - 1))]


# --- gRPC phases ---------------------------------------------------------------------------------


async def _session(stub: Any, mode: str, codes: Counter[str]) -> None:
    call = stub.Generate(REQUEST, timeout=0.002 if mode == "deadline" else 30)
    codes["opened"] += 1
    try:
        if mode == "full":
            async for _ in call:
                pass
        elif mode == "abandon":
            await call.read()
            await call.read()
            call.cancel()
        elif mode == "cancel_open":  # at once, or 1-3 ms in: while the orchestrator plans the answer
            await asyncio.sleep(0.001 * (codes["opened"] % 4))
            call.cancel()
        else:
            async for _ in call:
                pass
        codes[f"{mode} OK"] += 1
    except grpc.aio.AioRpcError as err:
        codes[f"{mode} {err.code().name}"] += 1
    except asyncio.CancelledError:
        codes[f"{mode} CANCELLED"] += 1


async def _grpc_flood(address: str) -> Counter[str]:
    codes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)

        async def run(plan: list[str], concurrency: int) -> None:
            gate = asyncio.Semaphore(concurrency)

            async def one(mode: str) -> None:
                async with gate:
                    await _session(stub, mode, codes)

            await asyncio.gather(*(one(mode) for mode in plan))

        async with asyncio.timeout(120):
            await run(["full"] * SESSIONS, CONCURRENCY)
            await run(["abandon"] * ABANDONED + ["cancel_open", "deadline"] * (CANCELLED // 2), CONCURRENCY)
            await run(["burst"] * BURST, 4 * CONCURRENCY)
    for _ in range(CHANNELS):
        async with grpc.aio.insecure_channel(address) as churn:
            await orchestrator_pb2_grpc.OrchestratorStub(churn).Status(opb.StatusRequest(), timeout=10)
        codes["channel opened and closed"] += 1
    return codes


# --- HTTP phases ---------------------------------------------------------------------------------


def _body(stream: bool) -> bytes:
    return json.dumps({"model": "tandem-local", "prompt": "def add(a, b):", "max_tokens": 16, "stream": stream}).encode()


async def _http_request(port: int, stream: bool) -> tuple[int, float]:
    """One completion; a stream is dropped after its first event. (status, ms)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = _body(stream)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    status = int((await reader.readline()).split()[1])
    if stream:
        await reader.readuntil(b"data: ")
    else:
        await reader.read()  # to the end: the server closes the connection after the answer
    writer.close()
    return status, 1000 * (time.perf_counter() - t0)


async def _slow_client(port: int, body: bool) -> float:
    """Trickles a request head (or a body) every 200 ms; seconds until the server hangs up."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
    writer.write(head + (b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{" if body else b""))
    async with asyncio.timeout(15):
        while True:
            try:
                writer.write(b"x" if body else b"X-Slow: 1\r\n")
                await writer.drain()
                data = await asyncio.wait_for(reader.read(1024), 0.2)
            except TimeoutError:
                continue
            except ConnectionError:
                break
            if not data or b"408" in data:
                break
    writer.close()
    return time.perf_counter() - t0


async def _http_flood(port: int) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    for i in range(HTTP_REQUESTS):
        status, _ = await _http_request(port, stream=i % 2 == 1)
        statuses[status] += 1
    slow = [asyncio.create_task(_slow_client(port, body=False)) for _ in range(SLOWLORIS)]
    slow += [asyncio.create_task(_slow_client(port, body=True)) for _ in range(SLOW_BODIES)]
    await asyncio.sleep(0.3)
    during = [await _http_request(port, stream=False) for _ in range(5)]
    held = await asyncio.gather(*slow)
    return {"statuses": dict(statuses), "during_ms": max(ms for _, ms in during),
            "during_status": {s for s, _ in during}, "head_held_s": max(held[:SLOWLORIS]),
            "body_held_s": max(held[SLOWLORIS:])}


# --- the test ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack() -> Iterator[FakeStack]:
    with fake_edge_stack(link=False, deltas=16, delay_s=0.001) as s:
        yield s


def test_flood_leaves_no_leak(stack: FakeStack) -> None:
    t_start = time.monotonic()
    runner, port = stack.call(start_http(create_http_app(stack.core, body_timeout_s=BODY_TIMEOUT_S), "127.0.0.1", 0,
                                         header_timeout_s=HEADER_TIMEOUT_S))
    try:
        with grpc.insecure_channel(stack.orchestrator.grpc_address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            p95_before = p95_ms(stub)
            gc.collect()
            fds_before, rss_before = fds(), rss_mb()
            peak = RssPeak()
            codes = asyncio.run(_grpc_flood(stack.orchestrator.grpc_address))
            http = asyncio.run(_http_flood(port))
            rss_peak = peak.stop()
            deadline = time.monotonic() + 10
            while (stack.core.active_generations or stack.edge.active) and time.monotonic() < deadline:
                time.sleep(0.02)
            active, edge_active = stack.core.active_generations, stack.edge.active
            p95_after = p95_ms(stub)
            gc.collect()
            time.sleep(0.5)  # closed sockets leave the fd table
            fds_after, rss_after = fds(), rss_mb()
    finally:
        stack.call(runner.cleanup())
    figures = {"codes": dict(sorted(codes.items())), "http": http, "active": active, "edge_active": edge_active,
               "fds": (fds_before, fds_after), "rss_mb": (round(rss_before), round(rss_peak), round(rss_after)),
               "p95_ms": (round(p95_before, 1), round(p95_after, 1)), "edge_calls": stack.edge.opened,
               "seconds": round(time.monotonic() - t_start, 1)}
    print("flood figures:", json.dumps(figures, default=sorted))
    assert sum(v for k, v in codes.items() if k.startswith("full")) == SESSIONS
    assert codes["full OK"] > 0.9 * SESSIONS
    assert {k.split()[1] for k in codes if k.startswith(("full", "burst"))} <= {"OK", "RESOURCE_EXHAUSTED"}
    assert codes["burst RESOURCE_EXHAUSTED"] > 0 and codes["burst OK"] > 0
    assert active == 0 and edge_active == 0, "every generation ended and freed its slot and its edge call"
    assert fds_after <= fds_before + FD_SLACK, (fds_before, fds_after)
    assert rss_after - rss_before < RSS_GROWTH_MB, (rss_before, rss_after)
    assert p95_after <= max(3 * p95_before, p95_before + 50), (p95_before, p95_after)
    assert http["statuses"] == {200: HTTP_REQUESTS} and http["during_status"] == {200}
    assert http["during_ms"] < 1000, "slow clients do not hold up a normal request"
    assert http["head_held_s"] < HEADER_TIMEOUT_S + 2, "a trickled request head is cut off at the header timeout"
    assert http["body_held_s"] < BODY_TIMEOUT_S + 2, "a trickled body gets 408 at the body timeout"
