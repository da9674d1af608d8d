"""`tandem bench --suite cloud-scale`: concurrent speculative sessions against the Serve deployment.

It starts a two-node Ray cluster on this machine (`tandem.ops.ray_cluster`: head + worker, one
replica slot each), deploys the Serve config rendered from `tandem.deploy.gen` (the production
spec with bench overrides: models, ports, a fixed replica count, `max_sessions`), and for each
replica count (1, 2) and each number of concurrent sessions N (1, 2, 4, 8) sends N greedy
speculative sessions at once from N edge processes (`tandem.bench.scale_edge`). It reports
aggregate verified tokens/s, p50/p95 of the per-round verify round trip (the first round, which
opens the session and prefills, is reported apart), sessions rejected (RESOURCE_EXHAUSTED) and
failed, sessions per replica, and whether every prompt's output matched its first run.

Models: `--models real` (the fetched pair, default) or `--models tiny` (random tiny models
built like the tests' fixture; needs the repository's tests/ folder). Progress lines go to
stderr; the table to stdout; `--json PATH` writes everything. Both "nodes" share this machine's
cores, so the 2-replica figures show scheduling, not added hardware. SIGTERM or Ctrl-C stops
the cluster and the edge processes before exiting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from tandem.bench.report import fmt, progress

_progress = partial(progress, tag="cloud-scale")

SESSIONS = (1, 2, 4, 8)
REPLICAS = (1, 2)
MAX_SESSIONS = 4  # per replica: small enough that 8 sessions on one replica show rejections



def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        from tandem.cli.main import CliError

        raise CliError(f"--{name}: expected comma-separated integers >= 1, got {text!r}")
    return values


def _models(kind: str, args: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    """(target folder, ONNX drafter folder, dtype) for `kind`."""
    from tandem.cli.main import CliError

    if kind == "tiny":
        from tandem.models import tiny

        _progress("building tiny random models ...")
        target = tiny.build_hf(work / "target", seed=1)
        drafter = tiny.build_onnx(tiny.perturb(target, work / "drafter", noise=0.03, seed=2), work / "drafter_onnx",
                                  work / "cache")
        return target, drafter, "fp32"
    if getattr(args, "target", None) and getattr(args, "drafter", None):
        return args.target, args.drafter, args.dtype
    from tandem.models import registry as models

    try:
        models.require_pair()
    except models.ModelsMissing as exc:
        raise CliError(str(exc)) from None
    return models.target_dir(), models.drafter_onnx_dir(), args.dtype


def _prompts(kind: str, target: Path) -> list[tuple[str, list[int]]]:
    if kind == "tiny":  # random weights: any token ids do
        return [(f"tiny-{i}", [(i * 37 + j * 11) % 500 + 3 for j in range(6 + i)]) for i in range(8)]
    from transformers import AutoTokenizer

    from cloud_node.scorer import encode_prompt
    from tandem.bench.main import default_prompts_path, load_prompts

    tokenizer = AutoTokenizer.from_pretrained(target)
    return [(p.id, encode_prompt(tokenizer, p.prompt, p.messages)) for p in load_prompts(default_prompts_path())]


def _spec(target: Path, dtype: str, replicas: int, max_sessions: int, ports: list[int]) -> Any:
    from tandem import paths
    from tandem.deploy.gen import DeploySpec

    return dataclasses.replace(
        DeploySpec(), model_dir=str(target), dtype=dtype, tandem_home=str(paths.tandem_home()),
        threads=max(1, (os.cpu_count() or 1) // replicas), max_sessions=max_sessions,
        http_host="127.0.0.1", http_port=ports[0], grpc_port=ports[1], proxy_location="HeadOnly",
        min_replicas=replicas, max_replicas=replicas, target_ongoing_requests=min(4.0, max_sessions),
        graceful_shutdown_timeout_s=5, max_surge_percent=0, replica_cpus=0.5, replica_memory_gb=0)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(replicas: int, results: list[dict[str, Any]], reference: dict[str, list[int]]) -> dict[str, Any]:
    """One table row from the sessions of one (replicas, N) run; updates `reference` per prompt."""
    done = [r for r in results if r["error"] is None]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    rounds = [ms for r in done for ms in r["round_ms"][1:]]
    identical = True
    for r in done:
        identical &= reference.setdefault(r["prompt"], r["tokens"]) == r["tokens"]
    per_replica = Counter((r["replica"] or "?").split("#")[-1].split(" ")[0] for r in done)
    return {
        "replicas": replicas, "sessions": len(results), "completed": len(done),
        "rejected": sum(r["rejected"] for r in results),
        "failed": sum(r["error"] is not None and not r["rejected"] for r in results),
        "verified_tokens": sum(len(r["tokens"]) for r in done), "wall_s": span,
        "agg_tok_s": sum(len(r["tokens"]) for r in done) / span if span > 0 else None,
        "verify_p50_ms": _percentile(rounds, 50), "verify_p95_ms": _percentile(rounds, 95),
        "open_p50_ms": _percentile([r["round_ms"][0] for r in done if r["round_ms"]], 50),
        "rounds": len(rounds), "sessions_per_replica": sorted(per_replica.values(), reverse=True),
        "identical": identical,
    }


def _jobs(prompts: list[tuple[str, list[int]]], n: int, args: argparse.Namespace, offset: int = 0) -> list[dict]:
    return [{"id": f"s{i}", "prompt": prompts[(offset + i) % len(prompts)][0],
             "prompt_ids": prompts[(offset + i) % len(prompts)][1], "max_new_tokens": args.max_new_tokens,
             "draft_len": args.draft_len} for i in range(n)]


def _run_replicas(cluster: Any, pool: Any, spec: Any, prompts: list, args: argparse.Namespace,
                  sessions: tuple[int, ...], reference: dict[str, list[int]]) -> list[dict[str, Any]]:
    from tandem.deploy.gen import SERVE_CONFIG, render, serve_names

    config = cluster.root / f"serve-{spec.min_replicas}.yaml"
    config.write_text(render(spec)[SERVE_CONFIG])
    cluster.serve_deploy(config)
    app, deployment, _ = serve_names()
    placed = cluster.wait_running(app, deployment, spec.min_replicas, timeout_s=300)
    _progress(f"{spec.min_replicas} replica(s) running on {[node for node, _ in placed]} "
              f"(torch threads {spec.threads} each); warming up")
    warm = argparse.Namespace(**{**vars(args), "max_new_tokens": min(8, args.max_new_tokens)})
    pool.run(_jobs(prompts, min(2 * spec.min_replicas, len(pool.procs)), warm))
    rows = []
    for n in sessions:
        results = pool.run(_jobs(prompts, n, args))
        for r, job in zip(results, _jobs(prompts, n, args)):
            r["prompt"] = job["prompt"]
        row = summarize(spec.min_replicas, results, reference)
        row["session_results"] = results
        rows.append(row)
        _progress(f"replicas={row['replicas']} sessions={n}: {fmt(row['agg_tok_s'], '.1f')} tok/s, verify p50 "
                  f"{fmt(row['verify_p50_ms'], '.0f')} ms p95 {fmt(row['verify_p95_ms'], '.0f')} ms, "
                  f"rejected {row['rejected']}, failed {row['failed']}, per replica {row['sessions_per_replica']}")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'replicas':>8} {'sessions':>8} {'agg tok/s':>9} {'verify p50 ms':>13} {'verify p95 ms':>13} "
            f"{'open p50 ms':>11} {'rejected':>8} {'failed':>6} {'per replica':>11}  identical")
    lines = [head]
    for r in rows:
        lines.append(f"{r['replicas']:>8} {r['sessions']:>8} {fmt(r['agg_tok_s'], '.1f'):>9} "
                     f"{fmt(r['verify_p50_ms'], '.0f'):>13} {fmt(r['verify_p95_ms'], '.0f'):>13} "
                     f"{fmt(r['open_p50_ms'], '.0f'):>11} {r['rejected']:>8} {r['failed']:>6} "
                     f"{'/'.join(map(str, r['sessions_per_replica'])) or '-':>11}  {fmt(r['identical'], '')}")
    return "\n".join(lines)


def _exit_on_sigterm(*_: object) -> None:
    raise SystemExit(143)  # unwinds the `with` blocks: the cluster and the edge processes stop


def run_suite(args: argparse.Namespace) -> int:
    """Entry point for `tandem bench --suite cloud-scale` (and `python -m tandem.bench.scale`)."""
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run_suite(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_suite(args: argparse.Namespace) -> int:
    from tandem.bench.report import machine_info
    from tandem.bench.scale_edge import EdgePool
    from tandem.ops.ray_cluster import LocalRayCluster, free_ports

    kind = getattr(args, "models", "real")
    sessions = _ints(getattr(args, "sessions", ",".join(map(str, SESSIONS))), "sessions")
    replica_counts = _ints(getattr(args, "replicas", ",".join(map(str, REPLICAS))), "replicas")
    max_sessions = getattr(args, "max_sessions", MAX_SESSIONS)
    if max(replica_counts) > 2:
        from tandem.cli.main import CliError

        raise CliError("--replicas: this machine runs a two-node cluster, so at most 2")
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tdm-scale-") as work:
        target, drafter, dtype = _models(kind, args, Path(work))
        prompts = _prompts(kind, target)
        ports = free_ports(2)
        base = _spec(target, dtype, 1, max_sessions, ports)
        with LocalRayCluster(env=base.node_env()) as cluster:
            _progress(f"starting a two-node Ray cluster in {cluster.root}")
            cluster.start_head(num_cpus=1, resources={base.replica_resource: 1})
            cluster.add_worker("worker", num_cpus=1, resources={base.replica_resource: 1})
            reference: dict[str, list[int]] = {}
            with EdgePool(max(sessions), drafter, f"127.0.0.1:{base.grpc_port}", Path(work) / "edge.log") as pool:
                for r in replica_counts:
                    spec = _spec(target, dtype, r, max_sessions, ports)
                    rows += _run_replicas(cluster, pool, spec, prompts, args, sessions, reference)
    print(format_table(rows))
    _progress(f"done in {time.monotonic() - t0:.0f} s")
    if args.json:
        config = {"models": kind, "target": str(target), "drafter": str(drafter), "dtype": dtype,
                  "max_new_tokens": args.max_new_tokens, "draft_len": args.draft_len, "max_sessions": max_sessions,
                  "sessions": sessions, "replicas": replica_counts, "nodes": "head + worker on one machine"}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"suite": "cloud-scale", "machine": machine_info(), "config": config,
                                         "results": rows}, indent=2) + "\n")
        _progress(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from tandem.cli.main import CliError

    parser = argparse.ArgumentParser(prog="python -m tandem.bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=("real", "tiny"), default="real")
    parser.add_argument("--sessions", default=",".join(map(str, SESSIONS)), help="concurrent sessions, e.g. 1,2,4,8")
    parser.add_argument("--replicas", default=",".join(map(str, REPLICAS)), help="replica counts, at most 2")
    parser.add_argument("--max-sessions", type=int, default=MAX_SESSIONS, help="per replica")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="real models only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        return run_suite(args)
    except CliError as exc:
        print(f"bench_scale: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
