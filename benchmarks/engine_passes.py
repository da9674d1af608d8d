"""Benchmark: what one engine pass costs as more sessions share it, in process, per tile class.

Issue 10 asks a replica for 3x the aggregate at 8 sessions over 1 session. A pass of N
sessions' rounds (5 rows each) reads every weight once per linear *tile*, so the ratio the
engine itself allows is N x pass(1) / pass(N). This script measures it on the real target,
without Serve, gRPC or clients, for two ways of running the linear layers:

- `engine`: the engine as the replica runs it (the autotuned, batch-invariant tile plan).
- `amx-packed` (an experiment, not an engine plan): oneDNN's prepacked bf16 weights
  (`torch.ops.mkldnn._reorder_linear_weight`) on linear tiles zero-padded to the smallest row
  count of the kernel class that 64-row tiles fall in. On CPUs with AMX, oneDNN takes another
  kernel from 33 rows on; with prepacked weights it stops reordering the weights on every call.
  The class is searched with the autotune's own `_class_around` (every row's bits equal to
  those it gets in a 64-row tile, for every row count in it, with this thread count and with
  one); norms and attention stay the engine's.

`--prefill N` also times a fresh prompt of N tokens prefilled in one call (the engine cuts it
into its tiles), per variant. Each session holds `--context` cached tokens; each pass appends a
5-row round to the first N sessions and is then cropped back, so every pass sees the same context. Prints progress lines,
the CPU and one table per variant; `--json` keeps the figures with the machine's description.

    python benchmarks/engine_passes.py [--sessions 1 2 4 6 8 12 16] [--context 300] [--reps 4]
        [--prefill 300] [--variants engine amx-packed] [--json out/engine-passes.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROUND = [11, 12, 13, 14, 15]  # one session's round: the last committed token and 4 drafts
CLASS_BASE = 64  # the row count the AMX kernel's class is grown from (autotune's largest tile)


def _packed_linear(engine: Any) -> tuple[Any, tuple[int, int]] | None:
    """A `linear(x, wb)` over prepacked weights on padded tiles, and its class (lo, hi); None
    where the weights are not bf16 or this torch has no oneDNN."""
    import torch

    from cloud_node.autotune import _class_around

    if engine.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    weights = [w[key][0] for w in engine._layers for key in ("q", "k", "v", "o", "gate", "up", "down")]
    weights.append(engine._head_w)
    print(f"packing {len(weights)} weight matrices for oneDNN ...", flush=True)
    packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(w, CLASS_BASE) for w in weights}

    def run(x: Any, w: Any, b: Any = None) -> Any:
        return torch.ops.mkldnn._linear_pointwise(x, packed[id(w)], b, "none", [], "")

    shapes = list({tuple(w.shape): w for w in weights}.values())  # one weight per distinct shape
    lo, hi = _class_around(run, shapes, CLASS_BASE)
    print(f"oneDNN prepacked class around {CLASS_BASE} rows: {lo}..{hi} rows", flush=True)

    def linear(x: Any, wb: tuple[Any, Any]) -> Any:
        w, b = wb
        outs = []
        for i in range(0, x.shape[0], hi):
            tile = x[i:i + hi]
            n = tile.shape[0]
            if n < lo:
                tile = torch.cat([tile, tile.new_zeros(lo - n, tile.shape[1])])
            outs.append(run(tile, w, b)[:n])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    return linear, (lo, hi)


def measure(engine: Any, caches: list[Any], context: int, sessions: list[int], reps: int) -> list[dict[str, Any]]:
    from cloud_node.engine import Rows

    rows: list[dict[str, Any]] = []
    for n in sessions:
        times = []
        for _ in range(reps + 1):  # the first pass of each size warms up
            batch = [Rows(caches[i], ROUND, len(ROUND)) for i in range(n)]
            t0 = time.perf_counter()
            engine.forward(batch)
            times.append((time.perf_counter() - t0) * 1e3)
            for c in caches[:n]:
                c.crop(context)
        times = times[1:]
        rows.append({"sessions": n, "rows": n * len(ROUND), "pass_ms_median": statistics.median(times),
                     "pass_ms_best": min(times)})
        print(f"  {n:2d} sessions ({n * len(ROUND):3d} rows): median {rows[-1]['pass_ms_median']:.0f} ms, "
              f"best {rows[-1]['pass_ms_best']:.0f} ms", flush=True)
    one = next((r["pass_ms_median"] for r in rows if r["sessions"] == 1), None)
    for r in rows:
        r["aggregate_vs_1"] = None if one is None else r["sessions"] * one / r["pass_ms_median"]
    return rows


def measure_prefill(engine: Any, tokens: int, reps: int) -> dict[str, Any]:
    """A fresh session's prefill of `tokens` tokens in one pass (the engine tiles it), ms."""
    from cloud_node.engine import Rows

    times = []
    for r in range(reps + 1):  # the first warms up
        cache = engine.new_cache()
        t0 = time.perf_counter()
        engine.forward([Rows(cache, [(11 * r + i) % 50000 + 100 for i in range(tokens)], 1)])
        times.append((time.perf_counter() - t0) * 1e3)
    times = times[1:]
    print(f"  prefill of {tokens} tokens: median {statistics.median(times):.0f} ms, best {min(times):.0f} ms",
          flush=True)
    return {"tokens": tokens, "ms_median": statistics.median(times), "ms_best": min(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 2, 4, 6, 8, 12, 16])
    parser.add_argument("--context", type=int, default=300, help="cached tokens per session")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["engine", "amx-packed"], choices=["engine", "amx-packed"])
    parser.add_argument("--prefill", type=int, default=300, help="also time a fresh prompt's prefill (0: no)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if min(args.sessions) < 1 or args.context < 1 or args.reps < 1 or args.prefill < 0:
        parser.error("--sessions, --context and --reps must be >= 1, --prefill >= 0")

    import torch

    from cloud_node.engine import Rows
    from cloud_node.scorer import TargetModel
    from tandem.bench.report import machine_info
    from tandem.models.registry import require_pair

    target, _ = require_pair()
    info = machine_info()
    print(f"CPU: {info['cpu']}, {info['cores']} cores; torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    print(f"loading {target.name} (bf16) ...", flush=True)
    model = TargetModel(target, "bf16")
    engine = model.engine
    model.close()  # the batcher's thread: passes here call the engine directly
    caches = []
    for s in range(max(args.sessions)):
        cache = engine.new_cache()
        engine.forward([Rows(cache, [(7 * s + i) % 50000 + 100 for i in range(args.context)], 0)])
        caches.append(cache)
        print(f"prefilled session {s + 1}/{max(args.sessions)}", end="\r", flush=True)
    print()
    results: dict[str, Any] = {"machine": info, "context": args.context, "round_rows": len(ROUND), "variants": {}}
    for variant in args.variants:
        if variant == "engine":
            desc = engine.plan.describe()
        else:
            found = _packed_linear(engine)
            if found is None:
                print("amx-packed: oneDNN packing is not available here; skipped", flush=True)
                continue
            engine.linear, (lo, hi) = found
            desc = f"oneDNN prepacked linears on {lo}..{hi}-row tiles (padded to {lo}); norms and attention as the engine"
        print(f"{variant}: {desc}", flush=True)
        rows = measure(engine, caches, args.context, sorted(set(args.sessions)), args.reps)
        prefill = measure_prefill(engine, args.prefill, args.reps) if args.prefill else None
        results["variants"][variant] = {"plan": desc, "rows": rows, "prefill": prefill}
    print(f"\nCPU: {info['cpu']}; context {args.context} tokens; 5-row rounds; median of {args.reps} passes")
    print(f"{'variant':>11} {'sessions':>8} {'rows':>5} {'pass ms':>8} {'per session ms':>14} {'aggregate vs 1':>14}")
    for variant, res in results["variants"].items():
        for r in res["rows"]:
            agg = "-" if r["aggregate_vs_1"] is None else f"x{r['aggregate_vs_1']:.2f}"
            print(f"{variant:>11} {r['sessions']:>8} {r['rows']:>5} {r['pass_ms_median']:>8.0f} "
                  f"{r['pass_ms_median'] / r['sessions']:>14.0f} {agg:>14}")
        if res["prefill"]:
            print(f"{variant:>11} prefill of {res['prefill']['tokens']} tokens: {res['prefill']['ms_median']:.0f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
