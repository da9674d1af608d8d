"""The sessions of `tandem bench --suite cloud-scale`: replayed recordings, real edge processes, or both.

Guarantees:
- `Loads.runs(replicas)` runs, against the deployment now serving, one warm-up and then one set
  of N concurrent sessions per N, for each load asked for, and yields (load, results) with
  results in the shape of `scale_edge.run_job`'s, each with its prompt id.
- Session i of a set gets prompt i modulo the number of prompts used (the first
  min(max N, prompts) of the list), so a set of N reuses prompts only past that number.
- `replay`: before its first set, each prompt's rounds are recorded once with the real drafter
  in one edge process, solo against the deployment (or read from the recording file when it
  holds them under the same settings), and written to that file. That process is stopped
  before any replay, unless the `edges` load needs it anyway.
- A `duration` that is negative, nan or inf is a ValueError, never read as "no duration".
- `reference` holds each prompt's solo tokens: the recorded ones, else (edges alone) the first
  completed run's. Every process started is stopped when the `with` block ends.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, Self

from tandem.bench import replay
from tandem.bench.report import progress
from tandem.bench.scale_edge import EdgePool

_progress = partial(progress, tag="cloud-scale")
WARMUP_ROUNDS = 2  # replayed per warm-up session: enough to open, prefill and verify


class Loads:
    """The concurrent sessions one cloud-scale run sends (see the module doc)."""

    def __init__(self, args: argparse.Namespace, work: Path, models: tuple[Path, Path, str], address: str,
                 prompts: Sequence[tuple[str, list[int]]], sessions: Sequence[int], loads: Sequence[str]) -> None:
        self.target, self.drafter, self.dtype = models
        self.address, self.sessions, self.loads = address, tuple(sessions), tuple(loads)
        self.prompts = list(prompts)[: min(max(sessions), len(prompts))]
        self.max_new_tokens, self.draft_len = args.max_new_tokens, args.draft_len
        self.duration_s = float(getattr(args, "duration", 0.0) or 0.0)  # > 0: closed-loop replay rows
        if not (math.isfinite(self.duration_s) and self.duration_s >= 0):  # `scale.check_args` refuses it first
            raise ValueError(f"duration: must be a finite number >= 0, got {self.duration_s}")
        self.replay_file: Path = getattr(args, "replay_file", None) or work / "replay.json"
        self._edge_log = work / "edge.log"
        self._stack = ExitStack()
        self._pool: EdgePool | None = None
        self.recorded: dict[str, Any] = {}
        self.reference: dict[str, list[int]] = {}

    def runs(self, replicas: int) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        if "replay" in self.loads:
            self._record()
            warm = replay.replay_many(self.address, self._replayed(2 * replicas), max_rounds=WARMUP_ROUNDS)
            _progress(f"replay warm-up: {sum(r['error'] is None for r in warm)} of {len(warm)} sessions answered")
            for n in self.sessions:
                if self.duration_s > 0:
                    order = [(pid, self.recorded[pid]) for pid, _ in self.prompts]
                    results, t0, t1 = replay.replay_closed_loop(self.address, order, n, self.duration_s)
                    for r in results:
                        r["window"] = (t0, t1)
                    yield "replay", results
                else:
                    yield "replay", replay.replay_many(self.address, self._replayed(n))
        if "edges" in self.loads:
            pool = self._edges()
            pool.run(self._jobs(min(2 * replicas, len(pool.procs)), min(8, self.max_new_tokens)))
            for n in self.sessions:
                jobs = self._jobs(n, self.max_new_tokens)
                results = pool.run(jobs)
                for result, job in zip(results, jobs):
                    result["prompt"] = job["prompt"]
                yield "edges", results

    def _replayed(self, n: int) -> list[tuple[str, dict[str, Any]]]:
        return [(pid, self.recorded[pid]) for pid in (self.prompts[i % len(self.prompts)][0] for i in range(n))]

    def _jobs(self, n: int, max_new_tokens: int) -> list[dict[str, Any]]:
        return [{"id": f"s{i}", "prompt": self.prompts[i % len(self.prompts)][0],
                 "prompt_ids": self.prompts[i % len(self.prompts)][1], "max_new_tokens": max_new_tokens,
                 "draft_len": self.draft_len} for i in range(n)]

    def _edges(self) -> EdgePool:
        if self._pool is None:
            n = max(self.sessions)
            _progress(f"starting {n} edge processes (the real drafter each)")
            self._pool = self._stack.enter_context(EdgePool(n, self.drafter, self.address, self._edge_log))
        return self._pool

    def _record(self) -> None:
        """Each prompt's solo rounds, from the file or recorded now (once per run)."""
        if self.recorded:
            return
        key = replay.recording_key(self.target, self.drafter, self.dtype, self.draft_len, self.max_new_tokens)
        self.recorded = replay.load_recording(self.replay_file, key, self.prompts)
        missing = [(pid, ids) for pid, ids in self.prompts if pid not in self.recorded]
        if self.recorded:
            _progress(f"replaying {len(self.recorded)} recorded prompt(s) from {self.replay_file}")
        if missing:
            with ExitStack() as own:
                pool = self._edges() if "edges" in self.loads else own.enter_context(
                    EdgePool(1, self.drafter, self.address, self._edge_log))
                for pid, ids in missing:
                    _progress(f"recording the drafter's rounds for {pid} (solo, {len(ids)} prompt tokens)")
                    job = {"id": pid, "prompt_ids": ids, "max_new_tokens": self.max_new_tokens,
                           "draft_len": self.draft_len, "record": True}
                    self.recorded[pid] = replay.from_run(pool.run([job])[0], self.max_new_tokens)
            replay.save_recording(self.replay_file, key, self.recorded)
            _progress(f"recorded {len(missing)} prompt(s) in {self.replay_file}")
        self.reference.update({pid: rec["tokens"] for pid, rec in self.recorded.items()})

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
