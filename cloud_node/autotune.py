"""Pick the engine's tile plan for this CPU and these weights: checked for invariance, then timed.

Why: a GEMM library may sum a row's products in a different order when the number of rows
changes (another kernel, another K blocking), so the same row can get different bf16 logits
alone and in a batch. The engine therefore runs linear layers on tiles whose row counts all lie
in one *invariance class*: a range of row counts [min_rows, rows] for which this CPU's kernel
gives every row bit-identical results, whatever the other rows hold and wherever the row sits.
Which classes exist depends on the CPU (AVX2, AVX-512 BF16, AMX), the library version, the thread
count and the shapes, so it is measured here, never assumed.

Guarantees:
- `choose_plan(weights)` tests each candidate (torch `F.linear`; the small-M kernel where it
  loads) on the model's own weight shapes with random rows: it finds the widest class around a
  base row count (holding with this process's thread count and with one thread, so replicas
  with fewer cores agree), checks position invariance (a row moved to another slot among other rows gives
  the same bits), and checks the attention's batched matmuls for invariance in batch count and
  key span. Candidates that fail are dropped. Among the rest it times each plan on three loads
  (one session's round, eight sessions' rounds, a 256-token prefill) and keeps the one with the
  best mean ratio to the fastest per load (the shortest-tile plan wins ties within 15%: it
  gives the cheapest single-session round).
- The result is cached as JSON under `tandem_home()/autotune`, keyed by the CPU model and flags,
  torch's version and thread count, the dtype and the shapes; a later start loads it in
  milliseconds. `$TANDEM_TILE_PLAN` (e.g. `torch:32:2`) overrides the choice (not verified).
- If no candidate passes, it falls back to torch on padded 16-row tiles with `verified=False`
  and logs a warning: output is then still exact in fp32 up to rounding, but bf16 batch
  invariance is not guaranteed on this machine (`/v1/status`-style reports show it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cloud_node.engine import TilePlan
from tandem.paths import tandem_home

log = logging.getLogger(__name__)

ENV = "TANDEM_TILE_PLAN"
MAX_ROWS = 64  # largest tile considered
# Reference row counts a class is grown from (each divides MAX_ROWS; one inside a found class is skipped).
_BASES = (16, 64, 32, 8)
_LOADS = (("round", 5, 2.0), ("8 rounds", 40, 1.0), ("prefill", 256, 1.0))  # (name, rows, weight)


def _cpu_key() -> str:
    model, flags = "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    have = set(line.split(":", 1)[1].split())
                    flags = ",".join(sorted(have & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16",
                                                    "amx_tile", "avx512_vnni", "avx_vnni"}))
    except OSError:
        pass
    return f"{model}|{flags}"


def cache_path(weights: Sequence[Any], dtype: str) -> Path:
    import torch

    shapes = sorted({tuple(w.shape) for w in weights})
    key = json.dumps([_cpu_key(), torch.__version__, torch.get_num_threads(), dtype, shapes])
    return tandem_home() / "autotune" / f"tiles-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _linear_fn(kind: str) -> Callable[[Any, Any], Any] | None:
    import torch.nn.functional as F

    if kind == "torch":
        return lambda x, w: F.linear(x, w)
    from cloud_node.kernels.build import load_kernel

    if load_kernel() is None:
        return None
    from cloud_node.kernels.linear import small_m_linear

    return lambda x, w: small_m_linear(x, w)


def _class_around(fn: Callable[[Any, Any], Any], weights: Sequence[Any], base: int) -> tuple[int, int]:
    """The widest [lo, hi] containing `base` where a pass of any row count in it gives every row
    the bits that row gets in a pass of exactly `base` rows."""
    import torch

    gen = torch.Generator().manual_seed(base)
    xs = {w.shape[1]: torch.randn(MAX_ROWS, w.shape[1], generator=gen).to(w.dtype) for w in weights}
    refs = [torch.cat([fn(xs[w.shape[1]][i:i + base], w) for i in range(0, MAX_ROWS, base)]) for w in weights]

    def same(m: int) -> bool:
        with _threads(1):  # a replica with fewer threads must agree (resume on another node)
            if not all(torch.equal(fn(xs[w.shape[1]][:m], w), ref[:m]) for w, ref in zip(weights, refs, strict=True)):
                return False
        return all(torch.equal(fn(xs[w.shape[1]][:m], w), ref[:m]) for w, ref in zip(weights, refs, strict=True))

    lo = base
    while lo > 1 and same(lo - 1):
        lo -= 1
    hi = base
    while hi < MAX_ROWS and same(hi + 1):
        hi += 1
    return lo, hi


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _position_invariant(fn: Callable[[Any, Any], Any], weights: Sequence[Any], rows: int) -> bool:
    """Rows moved to other slots, among other rows, keep their bits."""
    import torch

    gen = torch.Generator().manual_seed(7)
    for w in weights:
        x = torch.randn(rows, w.shape[1], generator=gen).to(w.dtype)
        y = fn(x, w)
        perm = torch.randperm(rows, generator=gen)
        other = torch.randn(rows, w.shape[1], generator=gen).to(w.dtype)
        other[: rows // 2] = x[perm[: rows // 2]]
        if not torch.equal(fn(other, w)[: rows // 2], y[perm[: rows // 2]]):
            return False
    return True


def attention_invariant(head_dim: int, group: int, att_rows: int, key_block: int) -> bool:
    """The attention's matmuls give each element the same bits whatever the batch count and key span."""
    import torch

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(16, group * att_rows, head_dim, generator=gen)
    k = torch.randn(16, 8 * key_block, head_dim, generator=gen)
    p = torch.rand(16, 8, group * att_rows, key_block, generator=gen)
    v = torch.randn(16, 8, key_block, head_dim, generator=gen)
    full = torch.bmm(q, k.transpose(1, 2))
    pv = torch.matmul(p, v)
    for n in sorted({1, torch.get_num_threads()}):
        with _threads(n):
            part = torch.bmm(q[:1], k[:1, :key_block].transpose(1, 2))
            if not torch.equal(full[:1, :, :key_block], part):
                return False
            if not torch.equal(pv[:1, :1], torch.matmul(p[:1, :1], v[:1, :1])):
                return False
    return True


def _time(fn: Callable[[Any, Any], Any], weights: Sequence[Any], rows: int, plan: TilePlan) -> float:
    """Seconds for the linear part of one layer (the given weights) on `rows` rows under `plan`."""
    import torch

    xs = {w.shape[1]: torch.zeros(max(rows, plan.rows), w.shape[1], dtype=w.dtype) for w in weights}
    sizes = [max(min(plan.rows, rows - t0), plan.min_rows) for t0 in range(0, rows, plan.rows)]
    t0 = time.perf_counter()
    for w in weights:
        for n in sizes:
            fn(xs[w.shape[1]][:n], w)
    return time.perf_counter() - t0


def candidates(weights: Sequence[Any]) -> list[TilePlan]:
    """Plans whose linear tiles were shown invariant here (not yet timed)."""
    plans: list[TilePlan] = []
    for kind in ("torch", "smallm"):
        fn = _linear_fn(kind)
        if fn is None:
            continue
        limit = 16 if kind == "smallm" else MAX_ROWS
        seen: list[tuple[int, int]] = []
        for base in _BASES:
            if base > limit or any(lo <= base <= hi for lo, hi in seen):
                continue
            lo, hi = _class_around(fn, weights, base)
            hi = min(hi, limit)
            seen.append((lo, hi))
            if not (_position_invariant(fn, weights, base) and _position_invariant(fn, weights, hi)):
                continue
            if lo < hi:  # tiles of lo..hi rows, shorter ones padded to lo
                plans.append(TilePlan(linear=kind, rows=hi, min_rows=lo, pad=False, verified=True))
            else:
                plans.append(TilePlan(linear=kind, rows=base, min_rows=base, pad=True, verified=True))
    return plans


def choose_plan(weights: Sequence[Any], *, head_dim: int, group: int, dtype: str,
                use_cache: bool = True) -> TilePlan:
    """The plan for this machine (cached); `weights` are one layer's linear weights plus the head's."""
    override = os.environ.get(ENV)
    if override:
        return parse_plan(override)
    path = cache_path(weights, dtype)
    if use_cache and path.exists():
        try:
            plan = TilePlan(**json.loads(path.read_text())["plan"])
            log.info("tile plan from %s: %s", path, plan.describe())
            return plan
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring the cached tile plan %s (%s)", path, exc)
    t0 = time.perf_counter()
    att_ok = attention_invariant(head_dim, group, TilePlan.att_rows, TilePlan.key_block)
    plans = candidates(weights) if att_ok else []
    if not plans:
        log.warning("no tile plan passed the invariance checks on this CPU: using padded 16-row torch tiles; "
                    "bf16 output may depend on batching here")
        return TilePlan(linear="torch", rows=16, min_rows=16, pad=True, verified=False)
    fns = {kind: _linear_fn(kind) for kind in {p.linear for p in plans}}
    times = {p: [float("inf")] * len(_LOADS) for p in plans}
    for rep in range(5):  # interleaved, best of five: the machine may be busy with other work
        for i, (_, rows, _) in enumerate(_LOADS):
            for p in plans:
                times[p][i] = min(times[p][i], _time(fns[p.linear], weights, rows, p))  # type: ignore[arg-type]
        if rep == 0 and len(plans) > 1:  # drop plans far behind on every load after one round
            first = [min(t[i] for t in times.values()) for i in range(len(_LOADS))]
            plans = [p for p in plans if min(t / b for t, b in zip(times[p], first, strict=True)) < 2.5]
            times = {p: times[p] for p in plans}
    best = [min(t[i] for t in times.values()) for i in range(len(_LOADS))]
    weight = sum(w for *_, w in _LOADS)

    def score(p: TilePlan) -> float:
        return sum(w * t / b for (_, _, w), t, b in zip(_LOADS, times[p], best, strict=True)) / weight

    # Noise margin: the plan with the shortest tiles (the cheapest single-session round) stays
    # unless another scores at least 15% better.
    plan = min(plans, key=score)
    shortest = min(plans, key=lambda p: (p.min_rows, score(p)))
    if score(shortest) <= 1.15 * score(plan):
        plan = shortest
    for p in plans:
        log.info("tile plan candidate %-60s %s score %.2f", p.describe(),
                 " ".join(f"{name} {t * 1000:.1f}ms" for (name, *_), t in zip(_LOADS, times[p], strict=True)), score(p))
    log.info("tile plan chosen in %.1f s: %s", time.perf_counter() - t0, plan.describe())
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"cpu": _cpu_key(), "plan": asdict(plan),
                                       "times_ms": {p.describe(): [round(t * 1000, 2) for t in ts]
                                                    for p, ts in times.items()}}, indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not cache the tile plan in %s (%s)", path, exc)
    return plan


def parse_plan(text: str) -> TilePlan:
    """`KIND:ROWS[:MIN_ROWS]` (e.g. `torch:32:2`, `smallm:16`); MIN_ROWS == ROWS means padded tiles."""
    parts = text.split(":")
    try:
        kind, rows = parts[0], int(parts[1])
        lo = int(parts[2]) if len(parts) > 2 else 1
    except (IndexError, ValueError):
        raise ValueError(f"{ENV} must look like torch:32:2 or smallm:16, got {text!r}") from None
    return TilePlan(linear=kind, rows=rows, min_rows=lo, pad=lo == rows, verified=False)
