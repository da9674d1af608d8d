"""Replayed load for `tandem bench --suite cloud-scale`: recorded rounds from light clients, no drafter.

Guarantees:
- A recording holds, per prompt, one solo greedy speculative session of the real drafter against
  the deployment (`tandem.bench.scale_edge` with `"record": true`): every round as sent (the
  drafts, rejected positions included, and a tree's parents) and as answered (the verdict's tokens and finished flag),
  and the whole answer. `load_recording` returns only the prompts recorded under the same
  settings (`recording_key`) and token ids; `save_recording` writes the JSON file (keeping its
  other prompts recorded under the same settings).
- `replay_session` sends one recording over a real Verify stream, as the edge does: the open and
  the first round at once, then each round after the previous verdict. Greedy verdicts are
  deterministic, so each must equal the recorded one; the first that differs stops the session
  (`diverged`, the round in `diverged_at`): it counts as neither completed nor failed.
- Its result has the fields of `scale_edge.run_job`'s (start and end in `time.time()`,
  `round_ms` with the first round trip timed from the open, tokens, replica, ServerTiming's
  prefilled and reused tokens and sessions per verdict's pass), and per round `server_ms`, the
  part of the round the replica timed itself (ServerTiming's queue + prefill + verify), so
  `round_ms - server_ms` is the path around it (client, proxy, Ray, the replica's handler), and
  `queue_ms`, the part of it spent before the round's pass started. RESOURCE_EXHAUSTED makes it
  `rejected`, with `retry_hint_ms` when the status carries a hint (google.rpc.RetryInfo in
  grpc-status-details-bin, or a `retry-after-ms` / `grpc-retry-pushback-ms` trailer); any other
  error is `error`. Nothing is retried.
- `replay_many` runs sessions on threads, one channel (one connection, made before the start)
  each, and releases them together. `replay_closed_loop` keeps N clients busy for a fixed
  window instead: client i replays prompts i, i+N, i+2N, ... (cycling) one session after the
  other and starts no session after the window ends, so a row measures a steady mix of prompts
  rather than its slowest one; each verdict's arrival time is kept (`verdicts_at`) so that
  throughput can be counted inside the window. A client imports grpc and the protos only: no drafter, no
  torch, no numpy, so the figures are the cloud's.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc, common_pb2

_CONNECT_TIMEOUT_S = 60.0
_HINT_KEYS = ("retry-after-ms", "grpc-retry-pushback-ms")


def recording_key(target: Path, drafter: Path, dtype: str, draft_len: int, max_new_tokens: int) -> dict[str, Any]:
    """The settings a recording depends on (besides each prompt's token ids)."""
    return {"target": str(target), "drafter": str(drafter), "dtype": dtype, "draft_len": draft_len,
            "max_new_tokens": max_new_tokens}


def load_recording(path: Path, key: dict[str, Any], prompts: Sequence[tuple[str, list[int]]]) -> dict[str, Any]:
    """The prompts of `path` recorded under `key` with the same token ids; {} if none."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("key") != key:
        return {}
    recorded = doc.get("prompts", {})
    return {pid: recorded[pid] for pid, ids in prompts if pid in recorded and recorded[pid]["prompt_ids"] == ids}


def save_recording(path: Path, key: dict[str, Any], recorded: dict[str, Any]) -> None:
    """Write `recorded`, keeping the file's other prompts when they were recorded under `key`."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = None
    kept = doc.get("prompts", {}) if isinstance(doc, dict) and doc.get("key") == key else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "prompts": kept | recorded}) + "\n")


def from_run(result: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """A recording from a `scale_edge.run_job` result with `"record": true` (which must have succeeded
    on one stream)."""
    if result["error"] is not None or not result.get("rounds") or result.get("resumes"):
        why = result["error"] or ("no rounds" if not result.get("rounds") else "the stream was resumed")
        raise RuntimeError(f"recording the drafts failed: {why}")
    return {"prompt_ids": result["prompt_ids"], "max_new_tokens": max_new_tokens, "rounds": result["rounds"],
            "tokens": result["tokens"]}


def retry_hint_ms(err: grpc.RpcError) -> float | None:
    """The retry delay a status carries, in ms, or None."""
    trailers = getattr(err, "trailing_metadata", lambda: None)() or ()
    metadata = {key: value for key, value in trailers}
    for key in _HINT_KEYS:
        try:
            return float(metadata[key])
        except (KeyError, TypeError, ValueError):
            continue
    raw = metadata.get("grpc-status-details-bin")
    if not isinstance(raw, bytes):
        return None
    try:  # googleapis-common-protos: comes with the cloud extra's dependencies
        from google.rpc import error_details_pb2, status_pb2
    except ImportError:
        return None
    try:
        status = status_pb2.Status.FromString(raw)
    except DecodeError:
        return None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToMilliseconds()
    return None


def _open_request(session_id: str, rec: dict[str, Any]) -> cloud_pb2.VerifyRequest:
    """The edge's own SessionSpec for a greedy session (`edge_node.cloud_link`, seed 0)."""
    greedy = common_pb2.SamplingParams(temperature=0.0, top_k=0, top_p=1.0, seed=0)
    return cloud_pb2.VerifyRequest(open=cloud_pb2.SessionSpec(
        session_id=session_id, prompt_tokens=rec["prompt_ids"], sampling=greedy,
        max_new_tokens=rec["max_new_tokens"]))


def _count(out: dict[str, Any], timing: cloud_pb2.ServerTiming, verdict: bool) -> None:
    out["prefill_tokens"] += timing.prefill_tokens
    out["reused_tokens"] += timing.reused_tokens
    if verdict:
        out["batch_sessions"].append(timing.batch_sessions)


def _reply(call: Iterator[cloud_pb2.VerifyResponse], kind: str) -> Any:
    response = next(call, None)
    if response is None:
        raise RuntimeError("the stream ended without a reply")
    if response.WhichOneof("kind") != kind:
        raise RuntimeError(f"expected {kind}, got {response.WhichOneof('kind')}")
    return getattr(response, kind)


def _drive(call: Iterator[cloud_pb2.VerifyResponse], requests: queue.Queue, rounds: list[dict[str, Any]],
           out: dict[str, Any]) -> None:
    """Send each recorded round after the previous verdict; stop at the first that differs."""
    t0 = time.perf_counter()  # the first round trip includes the open, as the edge's does
    for n, recorded in enumerate(rounds, 1):
        requests.put(cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(
            round=n, draft_tokens=recorded["drafts"], draft_parents=[a + 1 for a in recorded.get("parents") or ()])))
        if n == 1:
            opened = _reply(call, "opened")
            out["replica"] = opened.replica
            _count(out, opened.timing, verdict=False)
        verdict = _reply(call, "verdict")
        out["round_ms"].append(1000 * (time.perf_counter() - t0))
        timing = verdict.timing
        out["server_ms"].append(timing.queue_ms + timing.prefill_ms + timing.verify_ms)
        out["queue_ms"].append(timing.queue_ms)
        out["verdicts_at"].append((time.time(), len(verdict.tokens)))
        _count(out, verdict.timing, verdict=True)
        out["tokens"] += verdict.tokens
        if list(verdict.tokens) != recorded["tokens"] or verdict.finished != recorded["finished"]:
            out["diverged"], out["diverged_at"] = True, n
            return
        t0 = time.perf_counter()


def replay_session(address: str, rec: dict[str, Any], *, session_id: str, prompt: str,
                   start: threading.Barrier | None = None, max_rounds: int | None = None,
                   timeout_s: float = 900.0) -> dict[str, Any]:
    """One recorded session over a fresh channel (see the module doc); never raises for the cloud."""
    out: dict[str, Any] = {"id": session_id, "prompt": prompt, "tokens": [], "round_ms": [], "server_ms": [], "queue_ms": [],
                           "verdicts_at": [],
                           "batch_sessions": [],
                           "prefill_tokens": 0, "reused_tokens": 0, "replica": None, "rejected": False,
                           "retry_hint_ms": None, "diverged": False, "diverged_at": None, "error": None}
    rounds = rec["rounds"][:max_rounds] if max_rounds else rec["rounds"]
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=_CONNECT_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            out["error"] = f"cannot connect to {address}"
        if start is not None:
            start.wait(timeout=2 * _CONNECT_TIMEOUT_S)  # the others connect meanwhile
        out["start"] = time.time()
        if out["error"] is None:
            requests: queue.Queue = queue.Queue()
            requests.put(_open_request(session_id, rec))
            call = cloud_pb2_grpc.CloudVerifierStub(channel).Verify(iter(requests.get, None), timeout=timeout_s)
            try:
                _drive(call, requests, rounds, out)
            except grpc.RpcError as exc:
                _failed(out, exc)
            except RuntimeError as exc:
                out["error"] = str(exc)
            finally:
                requests.put(None)
                call.cancel()
        out["end"] = time.time()
    return out


def _failed(out: dict[str, Any], exc: grpc.RpcError) -> None:
    code = exc.code() if hasattr(exc, "code") else None
    out["error"] = f"{code.name if code else 'UNKNOWN'}: {exc.details() if hasattr(exc, 'details') else exc}"[:300]
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        out["rejected"], out["retry_hint_ms"] = True, retry_hint_ms(exc)


def replay_many(address: str, sessions: Sequence[tuple[str, dict[str, Any]]], *,
                max_rounds: int | None = None) -> list[dict[str, Any]]:
    """(prompt id, recording) per session, all started at once on their own threads; results in order."""
    start = threading.Barrier(len(sessions))
    with ThreadPoolExecutor(max_workers=len(sessions), thread_name_prefix="replay") as pool:
        futures = [pool.submit(replay_session, address, rec, session_id=f"s{i}", prompt=pid, start=start,
                               max_rounds=max_rounds) for i, (pid, rec) in enumerate(sessions)]
        return [f.result() for f in futures]


def replay_closed_loop(address: str, recorded: Sequence[tuple[str, dict[str, Any]]], clients: int,
                       duration_s: float) -> tuple[list[dict[str, Any]], float, float]:
    """N clients, each replaying sessions back to back for `duration_s` (see the module doc).
    Returns every session's result and the window (start, end) in `time.time()`."""
    start = threading.Barrier(clients + 1)
    window: list[float] = []

    def client(i: int) -> list[dict[str, Any]]:
        start.wait(timeout=2 * _CONNECT_TIMEOUT_S)
        results, n = [], 0
        while time.time() < window[0] + duration_s:
            pid, rec = recorded[(i + n * clients) % len(recorded)]
            results.append(replay_session(address, rec, session_id=f"c{i}s{n}", prompt=pid))
            n += 1
        return results

    with ThreadPoolExecutor(max_workers=clients, thread_name_prefix="replay") as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        window.append(time.time())
        start.wait(timeout=2 * _CONNECT_TIMEOUT_S)
        results = [r for f in futures for r in f.result()]
    return results, window[0], window[0] + duration_s


def tokens_in_window(results: Sequence[dict[str, Any]], t0: float, t1: float) -> int:
    """Tokens of the verdicts that arrived inside [t0, t1] (diverged sessions count up to their stop)."""
    return sum(n for r in results for at, n in r.get("verdicts_at", []) if t0 <= at <= t1)
