"""Flood the in-process cloud verifier with sessions, then check it left nothing behind.

A plain grpcio cloud (tiny fp32 target) on 127.0.0.1 gets FLOOD sessions from a few client
threads: most opened, verified once and closed; many abandoned mid-stream (cancelled after a
verdict, or their whole channel closed under them, as a dead client would); many cancelled
while the session opens. Afterwards:
- the session count is 0 and the KV bytes the store holds are back to 0 (the baseline);
- open file descriptors are back to the baseline (+ FD_SLACK), no stream reader thread is left;
- RSS grew by at most RSS_GROWTH_MB over the warmed-up baseline;
- a normal round's p95 latency is within P95_RATIO x the one before, + P95_SLACK_MS: a bound
  on leaks (sessions or threads left working), not a speed test.
The figures are printed in one `flood:` line (run with -s to see them). The whole test stays
bounded (a few thousand sessions, loopback only, about a minute on 2 cores).

The two leak paths found are pinned here too: a Generate session cancelled before its first
chunk (its generator never ran, so its `finally` never closed the session), and a Verify stream
ended while its open was still running.
"""

from __future__ import annotations

import gc
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import psutil
import pytest

from cloud_node.protocol import Admission, VerifyStream
from cloud_node.servicer import create_server
from cloud_node.verifier import Limits, SessionSpec, VerifierCore
from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc

FLOOD = {"closed": 1500, "abandoned": 600, "cancelled_in_open": 600}
CLIENT_THREADS = 6
RSS_GROWTH_MB = 64
FD_SLACK = 4
P95_RATIO, P95_SLACK_MS = 3.0, 50.0
LIMITS = Limits(max_sessions=16, max_context=256, max_draft_len=4, max_new_tokens=64)
PROMPT = [5, 17, 99, 3, 44, 101, 7]
_END = object()


@pytest.fixture(scope="module")
def core(tiny_models) -> VerifierCore:
    return VerifierCore.load(tiny_models.target_hf, dtype="fp32", limits=LIMITS, model_name="tiny")


@pytest.fixture(scope="module")
def address(core: VerifierCore) -> Iterator[str]:
    server, port = create_server(core, "127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _open(session_id: str, max_new: int = 8) -> cloud_pb2.VerifyRequest:
    spec = cloud_pb2.SessionSpec(session_id=session_id, prompt_tokens=PROMPT, max_new_tokens=max_new)
    return cloud_pb2.VerifyRequest(open=spec)


def _round(tokens: list[int]) -> cloud_pb2.VerifyRequest:
    return cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(draft_tokens=tokens))


def _retry_full(fn, *args) -> None:  # type: ignore[no-untyped-def]
    """Run a session; RESOURCE_EXHAUSTED (all 16 sessions taken) is waited out, anything else fails."""
    for _ in range(200):
        try:
            return fn(*args)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # type: ignore[attr-defined]
                raise
            time.sleep(0.01)
    raise AssertionError("the cloud stayed full")


def closed_session(stub: cloud_pb2_grpc.CloudVerifierStub, i: int) -> None:
    replies = list(stub.Verify(iter([_open(f"closed-{i}"), _round([5])]), timeout=30))
    assert [r.WhichOneof("kind") for r in replies] == ["opened", "verdict"]


def abandoned_session(stub: cloud_pb2_grpc.CloudVerifierStub, i: int) -> None:
    """Open, one verdict, then the client goes away without closing (cancel)."""
    requests: queue.Queue[object] = queue.Queue()
    call = stub.Verify(iter(requests.get, _END), timeout=30)
    requests.put(_open(f"abandoned-{i}"))
    requests.put(_round([5, 6]))
    try:
        next(call)
        next(call)
    finally:
        call.cancel()
        requests.put(_END)  # frees grpc's thread that feeds the requests (a client-side leak otherwise)


def cancelled_in_open(stub: cloud_pb2_grpc.CloudVerifierStub, i: int, rng: random.Random) -> None:
    requests: queue.Queue[object] = queue.Queue()
    call = stub.Verify(iter(requests.get, _END), timeout=30)
    requests.put(_open(f"cancelled-{i}"))
    time.sleep(rng.uniform(0, 0.004))  # before, during or just after the prefill
    call.cancel()
    requests.put(_END)


def dead_client(address: str, i: int, streams: int = 8) -> None:
    """A channel with several live sessions closed at once, as when a client process dies."""
    channel = grpc.insecure_channel(address)
    stub = cloud_pb2_grpc.CloudVerifierStub(channel)
    calls, feeds = [], []
    for j in range(streams):
        requests: queue.Queue[object] = queue.Queue()
        call = stub.Verify(iter(requests.get, _END), timeout=30)
        requests.put(_open(f"dead-{i}-{j}"))
        calls.append(call)
        feeds.append(requests)
    for call in calls:
        try:
            next(call)
        except grpc.RpcError as exc:  # the cloud may be full: fine, the point is the close below
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    channel.close()
    for requests in feeds:
        requests.put(_END)


def round_latencies_ms(stub: cloud_pb2_grpc.CloudVerifierStub, rounds: int = 40) -> list[float]:
    """A normal session's rounds (one token each), timed one by one at the client."""
    requests: queue.Queue[object] = queue.Queue()
    call = stub.Verify(iter(requests.get, _END), timeout=60)
    requests.put(_open("latency", max_new=rounds + 1))
    next(call)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        requests.put(_round([]))
        next(call)
        out.append(1000 * (time.perf_counter() - t0))
    requests.put(_END)
    call.cancel()
    return out


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settle(core: VerifierCore, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (len(core.store) or _inbox_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    gc.collect()


def _inbox_threads() -> int:
    return sum(t.name == "cloud-inbox" for t in threading.enumerate())


@pytest.mark.timeout(240)
def test_flood_of_sessions_leaves_nothing_behind(address: str, core: VerifierCore) -> None:
    proc, rng = psutil.Process(), random.Random(0)
    with grpc.insecure_channel(address) as channel:
        stub = cloud_pb2_grpc.CloudVerifierStub(channel)
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:  # warm up: pool threads, allocator, kernels
            list(pool.map(lambda i: _retry_full(closed_session, stub, i), range(60)))
        _settle(core)
        before_ms = round_latencies_ms(stub)
        _settle(core)
        rss0, fds0, peak = proc.memory_info().rss, _fds(), [0]
        stop = threading.Event()
        sampler = threading.Thread(target=lambda: [peak.__setitem__(0, max(peak[0], proc.memory_info().rss))
                                                   for _ in iter(lambda: stop.wait(0.2), True)], daemon=True)
        sampler.start()
        t0 = time.monotonic()
        jobs = ([(closed_session, i) for i in range(FLOOD["closed"])]
                + [(abandoned_session, i) for i in range(FLOOD["abandoned"])]
                + [(cancelled_in_open, i) for i in range(FLOOD["cancelled_in_open"])])
        rng.shuffle(jobs)
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            futures = [pool.submit(_retry_full, fn, stub, i, *((rng,) if fn is cancelled_in_open else ()))
                       for fn, i in jobs]
            futures += [pool.submit(dead_client, address, i) for i in range(20)]
            for f in futures:
                f.result()
        flood_s = time.monotonic() - t0
        _settle(core)
        stop.set()
        sampler.join()
        after_ms = round_latencies_ms(stub)
        _settle(core)
        rss1, fds1 = proc.memory_info().rss, _fds()
    p95_before, p95_after = float(np.percentile(before_ms, 95)), float(np.percentile(after_ms, 95))
    opened = sum(FLOOD.values()) + 20 * 8
    print(f"flood: {opened} sessions in {flood_s:.1f}s; sessions left {len(core.store)}; KV bytes "
          f"{core.store.resident_bytes()}; RSS {rss0 >> 20} MiB -> peak {max(peak[0], rss1) >> 20} -> final "
          f"{rss1 >> 20} MiB; fds {fds0} -> {fds1}; inbox threads left {_inbox_threads()}; p95 round "
          f"{p95_before:.1f} -> {p95_after:.1f} ms")
    # Nothing left open; what the prefix cache keeps stays within its bounds.
    assert len(core.store) == 0 and core.store.live_bytes() == 0
    assert core.store.retained_count() <= core.store.max_retained
    assert core.store.resident_bytes() <= core.limits.kv_budget_bytes
    assert _inbox_threads() == 0
    assert fds1 <= fds0 + FD_SLACK, (fds0, fds1)
    assert rss1 - rss0 <= RSS_GROWTH_MB << 20, (rss0 >> 20, rss1 >> 20)
    assert p95_after <= P95_RATIO * p95_before + P95_SLACK_MS, (p95_before, p95_after)


def test_a_generate_stream_closed_before_its_first_chunk_frees_its_session(core: VerifierCore) -> None:
    chunks = core.generate(SessionSpec(session_id="never-read", prompt_tokens=tuple(PROMPT), max_new_tokens=4))
    assert len(core.store) == 1
    chunks.close()
    assert len(core.store) == 0


def test_a_verify_stream_closed_while_its_open_runs_frees_the_session(core: VerifierCore,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    opening, release = threading.Event(), threading.Event()
    real_open = core.open

    def slow_open(spec, cancelled=None):  # type: ignore[no-untyped-def]
        opened = real_open(spec, cancelled)
        opening.set()
        release.wait(10)
        return opened

    monkeypatch.setattr(core, "open", slow_open)
    stream = VerifyStream(core, Admission())
    worker = threading.Thread(target=stream.handle, args=(_open("closing").SerializeToString(),))
    worker.start()
    assert opening.wait(10) and len(core.store) == 1
    stream.close()  # the stream ends (a cancel) while open has not returned yet
    release.set()
    worker.join(10)
    assert len(core.store) == 0
