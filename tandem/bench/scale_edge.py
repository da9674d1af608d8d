"""Edge processes for `tandem bench --suite cloud-scale`: each runs speculative sessions on demand.

Guarantees:
- `python -m tandem.bench.scale_edge --drafter DIR --cloud HOST:PORT` loads the ONNX drafter,
  prints `{"ready": true}`, then for each JSON job line on stdin runs one greedy speculative
  session with the edge node's own code (`edge_node.generation` over `edge_node.cloud_link`)
  and prints one JSON result line. It exits when stdin closes.
- A result carries the tokens, wall-clock start and end (`time.time()`, comparable across
  processes), the time of every round trip (send drafts -> verdict; the first one also opens the
  session and prefills), the replica that served it, what the cloud's ServerTiming reported
  (prefilled and reused tokens, sessions per verdict's pass), and how it failed: `rejected` when
  the cloud answered RESOURCE_EXHAUSTED (no resume is attempted), else `error`.
- A job with `"record": true` also returns its prompt ids and every round as sent and answered:
  the drafts (rejected positions included) and the verdict's tokens and finished flag. That is
  what `tandem.bench.replay` sends again without a drafter.
- `EdgePool` starts such processes, hands them jobs at the same moment and always stops them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from edge_node.cloud_link import CloudLink


class TimedLink(CloudLink):
    """A CloudLink that records each verify round trip in milliseconds, and the round itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.round_ms: list[float] = []
        self.rounds: list[dict[str, Any]] = []

    def send_round(self, draft_tokens: Sequence[int], q: Any, assume: Any = None,
                   parents: Sequence[int] | None = None) -> int:
        self._sent_at, self._drafts = time.perf_counter(), [int(t) for t in draft_tokens]
        self._parents = None if parents is None else [int(a) for a in parents]
        return super().send_round(draft_tokens, q, assume, parents)

    def recv_verdict(self, round_no: int) -> Any:
        verdict, dropped = super().recv_verdict(round_no)
        self.round_ms.append(1000 * (time.perf_counter() - self._sent_at))
        self.rounds.append({"drafts": self._drafts, "tokens": list(verdict.tokens), "finished": verdict.finished}
                           | ({"parents": self._parents} if self._parents is not None else {}))
        return verdict, dropped


def run_job(drafter: Any, channel: Any, job: dict[str, Any]) -> dict[str, Any]:
    """One greedy speculative session; never raises for a cloud-side failure."""
    from edge_node.cloud_link import CloudRejected, LinkError, SessionRequest
    from edge_node.generation import generate_speculative
    from tandem_core.sampling import SamplingParams

    ids, params = [int(t) for t in job["prompt_ids"]], SamplingParams()
    link = TimedLink(channel, SessionRequest(uuid.uuid4().hex, tuple(ids), params, 0, job["max_new_tokens"]),
                     round_timeout_s=job.get("round_timeout_s", 300.0), open_timeout_s=600.0)
    out: dict[str, Any] = {"id": job.get("id"), "start": time.time(), "tokens": [], "rejected": False, "error": None}
    try:
        # One round at a time (no pipelining), so the rounds recorded replay in order.
        result = generate_speculative(drafter, link, ids, params, 0, draft_len=job["draft_len"],
                                      max_new_tokens=job["max_new_tokens"], max_resumes=0, pipeline=False)
        out["tokens"] = list(result.tokens)
    except (LinkError, CloudRejected) as exc:
        out["rejected"] = "RESOURCE_EXHAUSTED" in str(exc)
        out["error"] = str(exc)[:300]
    out["end"] = time.time()
    out["round_ms"] = link.round_ms
    out["replica"] = link.opened.replica if link.opened is not None else None
    out["batch_sessions"] = link.batch_sessions
    out["prefill_tokens"], out["reused_tokens"] = link.prefill_tokens, link.reused_tokens
    if job.get("record"):
        out["prompt_ids"], out["rounds"], out["resumes"] = ids, link.rounds, link.resumes
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import grpc

    from edge_node.drafter import DrafterModel

    parser = argparse.ArgumentParser(prog="python -m tandem.bench.scale_edge")
    parser.add_argument("--drafter", type=Path, required=True)
    parser.add_argument("--cloud", required=True)
    args = parser.parse_args(argv)
    drafter = DrafterModel(args.drafter)
    with grpc.insecure_channel(args.cloud) as channel:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if line.strip():
                print(json.dumps(run_job(drafter, channel, json.loads(line))), flush=True)
    return 0


class EdgePool:
    """n edge processes; `run(jobs)` starts len(jobs) sessions at once and returns their results."""

    def __init__(self, n: int, drafter: Path, cloud: str, log_path: Path) -> None:
        self._log = open(log_path, "a")  # noqa: SIM115 - the processes' stderr until close()
        argv = [sys.executable, "-m", "tandem.bench.scale_edge", "--drafter", str(drafter), "--cloud", cloud]
        self.procs: list[subprocess.Popen] = []
        try:
            for _ in range(n):
                self.procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                   stderr=self._log, text=True, start_new_session=True))
            for proc in self.procs:
                line = proc.stdout.readline() if proc.stdout else ""
                if not line.startswith('{"ready"'):
                    raise RuntimeError(f"an edge process did not start (see {log_path}): {line!r}")
        except BaseException:
            self.close()
            raise

    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(jobs) > len(self.procs):
            raise ValueError(f"{len(jobs)} jobs for {len(self.procs)} edge processes")
        busy = self.procs[: len(jobs)]
        for proc, job in zip(busy, jobs):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
        results = []
        for proc in busy:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                raise RuntimeError(f"edge process {proc.pid} exited (code {proc.poll()})")
            results.append(json.loads(line))
        return results

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
