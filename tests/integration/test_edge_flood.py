"""A flood of Generate calls on the edge node, then a leak check.

An in-process edge node (127.0.0.1, port 0, the tiny ONNX drafter, local route, 4 slots) gets
thousands of Generate calls from 8 client threads at once: some run to the end, most are
cancelled right at open, after their first message or halfway, or hit a tiny deadline; the
slots being few, many are refused with RESOURCE_EXHAUSTED. Bounded: at most `CALLS` calls or
`BUDGET_S` seconds, on loopback only.

Afterwards, against a baseline taken after a warm-up:
- no generation is running (`EdgeCore.running` is 0) and `max_concurrent` parallel calls all
  succeed, so every slot came back;
- no generation thread is left and the other threads are back to the baseline (the gRPC
  server's pool, created lazily, is bounded by its `max_workers`);
- open file descriptors are back to the baseline (+ `FD_SLACK`);
- RSS grew by at most `RSS_GROWTH_MB` (peak and final reported);
- the p95 latency of a normal request is within `P95_FACTOR` x the baseline + `P95_SLACK_MS`:
  a leak check, not a speed test.
Run with `-s` to see the figures.
"""

from __future__ import annotations

import gc
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import psutil
import pytest

from edge_node.config import EdgeConfig
from edge_node.drafter import DrafterModel
from edge_node.servicer import EdgeServer, create_node
from protos.tandem.v1 import edge_pb2, edge_pb2_grpc

CALLS = 5000
BUDGET_S = 45.0
CLIENTS = 8
SLOTS = 4
RPC_WORKERS = 16
FD_SLACK = 4
RSS_GROWTH_MB = 64
P95_FACTOR, P95_SLACK_MS = 3.0, 25.0
EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.DEADLINE_EXCEEDED}
NORMAL = edge_pb2.EdgeGenerateRequest(prompt="def add(a, b):", max_new_tokens=8, mode=edge_pb2.EDGE_MODE_LOCAL)


@pytest.fixture(scope="module")
def node(tiny_models) -> Iterator[tuple[EdgeServer, grpc.Channel]]:
    node = create_node(DrafterModel(tiny_models.target_onnx), EdgeConfig(max_concurrent=SLOTS), "127.0.0.1:0",
                       max_workers=RPC_WORKERS)
    node.server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{node.port}")
    yield node, channel
    channel.close()
    node.server.stop(None)


def _request(rng: random.Random, long: bool) -> edge_pb2.EdgeGenerateRequest:
    return edge_pb2.EdgeGenerateRequest(prompt=rng.choice(["def add(a, b):", "Hello", "import json"]),
                                        max_new_tokens=rng.randint(32, 96) if long else rng.randint(1, 8),
                                        mode=edge_pb2.EDGE_MODE_LOCAL)


def _one_call(stub: edge_pb2_grpc.EdgeNodeStub, rng: random.Random) -> grpc.StatusCode:
    """One call in one of six shapes; returns its status code."""
    shape = rng.randrange(6)
    call = stub.Generate(_request(rng, long=shape in (2, 3, 4)), timeout=0.005 if shape == 5 else 30)
    try:
        if shape == 1:  # cancelled right at open
            call.cancel()
        elif shape == 4:  # opened, not read, cancelled a moment later
            time.sleep(rng.random() * 0.005)
            call.cancel()
        for n, _ in enumerate(call, 1):
            if (shape == 2 and n == 1) or (shape == 3 and n == rng.randint(1, 20)):  # halfway
                call.cancel()
                break
    except grpc.RpcError:
        pass
    return call.code()


def _flood(channel: grpc.Channel) -> tuple[Counter, float]:
    stub = edge_pb2_grpc.EdgeNodeStub(channel)
    codes: Counter = Counter()
    lock, opened, t0 = threading.Lock(), [0], time.monotonic()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() - t0 < BUDGET_S:
            with lock:
                if opened[0] >= CALLS:
                    return
                opened[0] += 1
            code = _one_call(stub, rng)
            with lock:
                codes[code] += 1

    threads = [threading.Thread(target=client, args=(i,), name=f"flood-{i}") for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BUDGET_S + 60)
    return codes, time.monotonic() - t0


def _p95_ms(stub: edge_pb2_grpc.EdgeNodeStub, n: int = 40) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        assert list(stub.Generate(NORMAL, timeout=30))[-1].stats.generated_tokens >= 1
        times.append(1000 * (time.perf_counter() - t))
    return sorted(times)[int(0.95 * n) - 1]


def _threads() -> Counter:
    """Live threads by kind: the gRPC server's bounded pool, generation workers, the rest."""
    kinds: Counter = Counter()
    for t in threading.enumerate():
        kinds["rpc-pool" if t.name.startswith("edge-rpc") else "generate" if t.name == "edge-generate" else "other"] += 1
    return kinds


def _fds() -> int:
    return psutil.Process().num_fds()


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _parallel_calls_succeed(stub: edge_pb2_grpc.EdgeNodeStub, n: int) -> bool:
    barrier, ok = threading.Barrier(n), []

    def call() -> None:
        barrier.wait(10)
        request = edge_pb2.EdgeGenerateRequest(prompt="Hello", max_new_tokens=32, mode=edge_pb2.EDGE_MODE_LOCAL)
        ok.append(list(stub.Generate(request, timeout=30))[-1].stats.generated_tokens >= 1)

    threads = [threading.Thread(target=call) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return ok == [True] * n


def _settle(node: EdgeServer, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (node.core.running or _threads()["generate"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    gc.collect()
    time.sleep(0.2)


def test_flood_of_generate_calls_leaks_nothing(node) -> None:
    server, channel = node
    stub = edge_pb2_grpc.EdgeNodeStub(channel)
    _flood_warm_up(channel)
    _settle(server)
    threads0, fds0, rss0, p95_0 = _threads(), _fds(), _rss_mb(), _p95_ms(stub)

    peak, stop = [rss0], threading.Event()

    def sample_rss() -> None:
        while not stop.wait(0.2):
            peak.append(_rss_mb())

    sampler = threading.Thread(target=sample_rss, name="rss-sampler")
    sampler.start()
    try:
        codes, wall_s = _flood(channel)
    finally:
        stop.set()
        sampler.join()
    _settle(server)
    threads1, fds1, rss1 = _threads(), _fds(), _rss_mb()
    slots_ok = _parallel_calls_succeed(stub, SLOTS)
    p95_1 = _p95_ms(stub)
    calls = sum(codes.values())
    print(f"\nflood: {calls} calls in {wall_s:.1f} s {dict((c.name, n) for c, n in codes.items())}; "
          f"threads {dict(threads0)} -> {dict(threads1)}; fds {fds0} -> {fds1}; "
          f"RSS {rss0:.0f} MB, peak {max(peak):.0f} MB, final {rss1:.0f} MB; p95 {p95_0:.1f} -> {p95_1:.1f} ms")

    assert set(codes) <= EXPECTED, codes
    assert calls >= 1000 and codes[grpc.StatusCode.OK] and codes[grpc.StatusCode.CANCELLED]
    assert server.core.running == 0 and slots_ok
    assert threads1["generate"] == 0 and threads1["other"] <= threads0["other"]
    assert threads1["rpc-pool"] <= RPC_WORKERS
    assert fds1 <= fds0 + FD_SLACK
    assert rss1 - rss0 <= RSS_GROWTH_MB
    assert p95_1 <= P95_FACTOR * p95_0 + P95_SLACK_MS


def _flood_warm_up(channel: grpc.Channel) -> None:
    """A short flood first, so that lazily created threads and caches exist at the baseline."""
    stub, rng = edge_pb2_grpc.EdgeNodeStub(channel), random.Random(99)
    threads = [threading.Thread(target=lambda: [_one_call(stub, rng) for _ in range(25)]) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    _p95_ms(stub, n=10)

