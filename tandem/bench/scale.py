"""`tandem bench --suite cloud-scale`: concurrent speculative sessions against the Serve deployment.

It starts a two-node Ray cluster on this machine (`tandem.ops.ray_cluster`: head + worker, one
replica slot each), deploys the Serve config rendered from `tandem.deploy.gen` (the production
spec with bench overrides: models, ports, a fixed replica count, and `max_sessions` only when
`--max-sessions` is given), and for each replica count (1, 2) and each number of concurrent
sessions N (1, 2, 4, 8, 16) sends N greedy speculative sessions at once. The load comes from:
- `replay` (default): the real drafter's rounds are recorded once per prompt, from a solo
  session against the deployment (`tandem.bench.replay`, kept in a JSON file in the work folder
  or at `--replay-file`), then N light clients on threads send them again over real Verify
  streams, with no drafter running. So the figures measure the cloud, not edges competing with
  it for the same cores. Each replayed session must follow its recorded path: one that diverges
  is stopped and counted.
- `edges`: N edge processes with the real drafter (`tandem.bench.scale_edge`), as a device
  fleet would; here they share the cloud's cores. `--load replay,edges` gives both rows.
It reports per (load, replicas, N): aggregate verified tokens/s, p50/p95 of the per-round
verify round trip (the first round, which opens the session and prefills, is reported apart),
the p50 of the part of a round the replica timed itself (queue + prefill + verify, from the
verdict's ServerTiming; replay load only; its queue part, before the round's pass started, is in
the progress line and the JSON) and of the rest of the round (`path`: the client, Serve's
proxy, Ray, the replica's handler),
the mean sessions per verdict's forward pass (the cloud's ServerTiming.batch_sessions; "-" when
it reports none), sessions rejected with RESOURCE_EXHAUSTED (and the retry hint, if any), failed
(any other error), diverged, sessions per replica, and whether every session's tokens equal
its prompt's solo run (`identical`).

Models: `--models real` (the fetched pair, default) or `--models tiny` (random tiny models from
`tandem.models.tiny`). Progress lines go to stderr; the machine's CPU and the table to stdout;
`--json PATH` writes everything. Both "nodes" share this machine's cores, so the 2-replica
figures show scheduling, not added hardware. SIGTERM or Ctrl-C stops the cluster and the edge
processes before exiting. Its flags are checked first (`check_args`): a bad one exits 2 with one
line, before any cluster or process starts.
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
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from tandem.bench.report import fmt, machine_info, progress

_progress = partial(progress, tag="cloud-scale")

SESSIONS = (1, 2, 4, 8, 16)
REPLICAS = (1, 2)
LOADS = ("replay", "edges")


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        from tandem.cli.main import CliError

        raise CliError(f"--{name}: expected comma-separated integers >= 1, got {text!r}")
    return values


def _loads(text: str) -> tuple[str, ...]:
    loads = tuple(x.strip() for x in str(text).split(",") if x.strip())
    if not loads or any(x not in LOADS for x in loads):
        from tandem.cli.main import CliError

        raise CliError(f"--load: expected {' or '.join(LOADS)} (or both, comma-separated), got {text!r}")
    return loads


def check_args(args: argparse.Namespace) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...]]:
    """The suite's flags, before any cluster or process starts: CliError (exit 2, one line);
    returns the parsed (sessions, replica counts, loads). `tandem bench` checks the flags every
    suite shares (`--duration` among them) before this."""
    from tandem.cli.main import CliError

    sessions = _ints(getattr(args, "sessions", ",".join(map(str, SESSIONS))), "sessions")
    replica_counts = _ints(getattr(args, "replicas", ",".join(map(str, REPLICAS))), "replicas")
    if max(replica_counts) > 2:
        raise CliError("--replicas: this machine runs a two-node cluster, so at most 2")
    loads = _loads(getattr(args, "load", LOADS[0]))
    max_sessions = getattr(args, "max_sessions", None)
    if max_sessions is None:
        return sessions, replica_counts, loads
    if max_sessions < 1:
        raise CliError(f"--max-sessions: must be >= 1, got {max_sessions}")
    try:  # what the deploy spec takes (`tandem.deploy.spec.DeploySpec.__post_init__`)
        _spec(Path("."), "bf16", 1, max_sessions, [0, 0])
    except ValueError as exc:
        raise CliError(f"--max-sessions: the deployment refuses {max_sessions}: {exc}") from None
    return sessions, replica_counts, loads


def bench_models(kind: str, args: argparse.Namespace, work: Path, say: Callable[[str], None] = _progress
                 ) -> tuple[Path, Path, str]:
    """(target folder, ONNX drafter folder, dtype) for `kind` ("real" or "tiny", built in `work`)."""
    from tandem.cli.main import CliError

    if kind == "tiny":
        from tandem.models import tiny

        say("building tiny random models ...")
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


SCALE_CATEGORIES = ("code", "prose", "chat")


def _prompts(kind: str, target: Path) -> list[tuple[str, list[int]]]:
    if kind == "tiny":  # random weights: any token ids do
        return [(f"tiny-{i}", [(i * 37 + j * 11) % 500 + 3 for j in range(6 + i)]) for i in range(8)]
    from transformers import AutoTokenizer

    from cloud_node.scorer import encode_prompt
    from tandem.bench.main import default_prompts_path, load_prompts

    tokenizer = AutoTokenizer.from_pretrained(target)
    # The set the recorded figures used: the edit and personal sets (issue 17) are long prompts
    # that would change what a row measures.
    return [(p.id, encode_prompt(tokenizer, p.prompt, p.messages)) for p in load_prompts(default_prompts_path())
            if p.category in SCALE_CATEGORIES]


def _spec(target: Path, dtype: str, replicas: int, max_sessions: int | None, ports: list[int]) -> Any:
    from tandem import paths
    from tandem.deploy.gen import DeploySpec

    # Admission is the deployment's own unless --max-sessions overrides it.
    limits: dict[str, Any] = {} if max_sessions is None else {
        "max_sessions": max_sessions, "target_ongoing_requests": min(4.0, max_sessions / 2)}
    return dataclasses.replace(
        DeploySpec(), model_dir=str(target), dtype=dtype, tandem_home=str(paths.tandem_home()),
        threads=max(1, (os.cpu_count() or 1) // replicas), http_host="127.0.0.1", http_port=ports[0],
        grpc_port=ports[1], proxy_location="HeadOnly", min_replicas=replicas, max_replicas=replicas,
        graceful_shutdown_timeout_s=5, max_surge_percent=0, replica_cpus=0.5, replica_memory_gb=0,
        gateway_secret_file="", **limits)  # the bench's clients call Serve's proxy directly (loopback)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(load: str, replicas: int, results: list[dict[str, Any]], reference: dict[str, list[int]]
              ) -> dict[str, Any]:
    """One table row from the sessions of one (load, replicas, N) run; `reference` holds each
    prompt's solo tokens (a prompt without one takes its first completed run here)."""
    done = [r for r in results if r["error"] is None and not r.get("diverged")]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    window = results[0].get("window") if results else None
    if window is not None:  # closed loop: count what the clients got inside the window
        from tandem.bench.replay import tokens_in_window

        span = window[1] - window[0]
        windowed = tokens_in_window([r for r in results if r["error"] is None], *window)
    rounds = [ms for r in done for ms in r["round_ms"][1:]]
    timed = [(ms, server) for r in done if r.get("server_ms") for ms, server in zip(r["round_ms"][1:], r["server_ms"][1:])]
    identical = not any(r.get("diverged") for r in results)
    for r in done:
        identical &= reference.setdefault(r["prompt"], r["tokens"]) == r["tokens"]
    per_replica = Counter((r["replica"] or "?").split("#")[-1].split(" ")[0] for r in done)
    batch = [b for r in done for b in r.get("batch_sessions", []) if b > 0]  # 0: the cloud did not say
    hints = [r["retry_hint_ms"] for r in results if r.get("retry_hint_ms") is not None]
    return {
        "load": load, "replicas": replicas,
        "sessions": len({r["id"].split("s")[0] for r in results}) if window is not None else len(results),
        "sessions_run": len(results), "completed": len(done),
        "rejected": sum(r["rejected"] for r in results),
        "failed": sum(r["error"] is not None and not r["rejected"] for r in results),
        "diverged": sum(bool(r.get("diverged")) for r in results),
        "verified_tokens": sum(len(r["tokens"]) for r in done), "wall_s": span,
        "agg_tok_s": ((windowed if window is not None else sum(len(r["tokens"]) for r in done)) / span
                      if span > 0 else None),
        "clients": len({r["id"].split("s")[0] for r in results}) if window is not None else len(results),
        "verify_p50_ms": _percentile(rounds, 50), "verify_p95_ms": _percentile(rounds, 95),
        "server_p50_ms": _percentile([server for _, server in timed], 50),
        "path_p50_ms": _percentile([ms - server for ms, server in timed], 50),
        "queue_p50_ms": _percentile([q for r in done for q in r.get("queue_ms", [])[1:]], 50),
        "open_p50_ms": _percentile([r["round_ms"][0] for r in done if r["round_ms"]], 50),
        "batch_sessions_mean": statistics.fmean(batch) if batch else None,
        "retry_hint_ms": statistics.median(hints) if hints else None,
        "prefill_tokens": sum(r.get("prefill_tokens", 0) for r in done),
        "reused_tokens": sum(r.get("reused_tokens", 0) for r in done),
        "rounds": len(rounds), "sessions_per_replica": sorted(per_replica.values(), reverse=True),
        "identical": identical,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'load':<6} {'replicas':>8} {'sessions':>8} {'agg tok/s':>9} {'verify p50 ms':>13} "
            f"{'verify p95 ms':>13} {'server p50':>10} {'path p50':>8} {'open p50 ms':>11} {'batch':>5} "
            f"{'rejected':>8} {'retry ms':>8} "
            f"{'failed':>6} {'diverged':>8} {'per replica':>11}  identical")
    lines = [head]
    for r in rows:
        lines.append(f"{r['load']:<6} {r['replicas']:>8} {r['sessions']:>8} {fmt(r['agg_tok_s'], '.1f'):>9} "
                     f"{fmt(r['verify_p50_ms'], '.0f'):>13} {fmt(r['verify_p95_ms'], '.0f'):>13} "
                     f"{fmt(r.get('server_p50_ms'), '.0f'):>10} {fmt(r.get('path_p50_ms'), '.0f'):>8} "
                     f"{fmt(r['open_p50_ms'], '.0f'):>11} {fmt(r['batch_sessions_mean'], '.1f'):>5} "
                     f"{r['rejected']:>8} {fmt(r['retry_hint_ms'], '.0f'):>8} {r['failed']:>6} {r['diverged']:>8} "
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
    from tandem.bench.scale_load import Loads
    from tandem.ops.ray_cluster import LocalRayCluster, free_ports

    sessions, replica_counts, loads = check_args(args)
    kind = getattr(args, "models", "real")
    max_sessions = getattr(args, "max_sessions", None)
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tdm-scale-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        target, drafter, dtype = bench_models(kind, args, work)
        ports = free_ports(2)
        base = _spec(target, dtype, 1, max_sessions, ports)
        cluster = stack.enter_context(LocalRayCluster(env=base.node_env()))
        _progress(f"starting a two-node Ray cluster in {cluster.root}")
        cluster.start_head(num_cpus=1, resources={base.replica_resource: 1})
        cluster.add_worker("worker", num_cpus=1, resources={base.replica_resource: 1})
        load = stack.enter_context(Loads(args, work, (target, drafter, dtype), f"127.0.0.1:{base.grpc_port}",
                                         _prompts(kind, target), sessions, loads))
        for r in replica_counts:
            _deploy(cluster, _spec(target, dtype, r, max_sessions, ports))
            for name, results in load.runs(r):
                rows.append(summarize(name, r, results, load.reference) | {"session_results": results})
                _report(rows[-1])
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB")
    print(format_table(rows))
    _progress(f"done in {time.monotonic() - t0:.0f} s")
    if args.json:
        config = {"models": kind, "target": str(target), "drafter": str(drafter), "dtype": dtype,
                  "max_new_tokens": args.max_new_tokens, "draft_len": args.draft_len, "max_sessions": max_sessions,
                  "sessions": sessions, "replicas": replica_counts, "load": loads,
                  "replay_file": str(load.replay_file), "nodes": "head + worker on one machine"}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"suite": "cloud-scale", "machine": info, "config": config,
                                         "results": rows}, indent=2) + "\n")
        _progress(f"wrote {args.json}")
    return 0


def _report(row: dict[str, Any]) -> None:
    _progress(f"{row['load']} replicas={row['replicas']} sessions={row['sessions']}: {fmt(row['agg_tok_s'], '.1f')} "
              f"tok/s, verify p50 {fmt(row['verify_p50_ms'], '.0f')} ms p95 {fmt(row['verify_p95_ms'], '.0f')} ms "
              f"(server p50 {fmt(row.get('server_p50_ms'), '.0f')} of which queue {fmt(row.get('queue_p50_ms'), '.0f')}, "
              f"path p50 {fmt(row.get('path_p50_ms'), '.0f')}), "
              f"batch {fmt(row['batch_sessions_mean'], '.1f')}, rejected {row['rejected']}, failed {row['failed']}, "
              f"diverged {row['diverged']}, per replica {row['sessions_per_replica']}")


def _deploy(cluster: Any, spec: Any) -> None:
    from tandem.deploy.gen import SERVE_CONFIG, render, serve_names
    from tandem.ops.procs import wait_healthy

    config = cluster.root / f"serve-{spec.min_replicas}.yaml"
    config.write_text(render(spec)[SERVE_CONFIG])
    cluster.serve_deploy(config)
    app, deployment, _ = serve_names()
    placed = cluster.wait_running(app, deployment, spec.min_replicas, timeout_s=300)
    wait_healthy(f"127.0.0.1:{spec.grpc_port}", timeout_s=120)
    _progress(f"{spec.min_replicas} replica(s) running on {[node for node, _ in placed]} "
              f"(torch threads {spec.threads} each)")


def main(argv: list[str] | None = None) -> int:
    from tandem.cli.main import CliError

    parser = argparse.ArgumentParser(prog="python -m tandem.bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=("real", "tiny"), default="real")
    parser.add_argument("--load", default=LOADS[0], help="replay (recorded drafts, light clients), edges (real "
                                                         "drafters), or replay,edges")
    parser.add_argument("--sessions", default=",".join(map(str, SESSIONS)), help="concurrent sessions, e.g. 1,2,4,8")
    parser.add_argument("--replicas", default=",".join(map(str, REPLICAS)), help="replica counts, at most 2")
    parser.add_argument("--max-sessions", type=int, default=None, help="per replica (default: the deployment's)")
    parser.add_argument("--replay-file", type=Path, default=None, help="keep or reuse the recorded drafts here")
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
