"""`tandem bench`: generation methods side by side in one process.

Guarantees:
- Every method runs on every prompt in the same process, after a warm-up of every method, in an
  order that rotates from prompt to prompt, so drift on a shared, noisy machine hits all methods.
- Greedy runs record whether each method's tokens equal the target's (`identical_to_target`:
  transformers `generate`) and the product's own target-only path's (`identical_to_cloud_only`:
  the engine's cloud-only decoding, the same dtype), the latter bit for bit in bf16 too.
- `--temperature T` (> 0) samples every method with T and `--seed`; the rows then report
  speedup and acceptance, and no method claims identical output (None).
- `--split-cores` (`tandem.bench.cores`): the edge (this process's drafter, ONNX Runtime) on one
  CPU and the cloud (the Serve replica's target) on another, one thread each; the target alone
  (`target`, `cloud_only`) runs on the cloud's CPU with one thread; `tandem`, `tandem_model` and
  `assisted`, drafter and target in turn in one thread, may use both CPUs. Fewer than 2 CPUs is a
  usage error (exit code 2). The JSON's `config.split_cores` says what each side was given and
  what the kernel applied (each thread's `Cpus_allowed_list`).
- Every numeric flag is checked before anything loads or starts, for every suite: a value out
  of range, negative, nan or inf exits 2 with one line naming the flag (`check_args`).
- The JSON written with `--json` has the shape
  {"machine": {...}, "config": {...}, "results": [row, ...]} with the rows of
  `tandem.bench_report.FIELDS`; progress lines go to stderr while it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tandem.bench.cores import Placement, plan_cores
from tandem.bench.report import Run, aggregate, format_table, machine_info
from tandem.bench.report import progress as _progress
from tandem.cli.main import CliError

METHODS = ("target", "cloud_only", "assisted", "drafter", "tandem")
# the same without retrieval drafts (`tandem_core.lookup`): the model drafter alone, for ratios
NO_LOOKUP_METHODS = ("drafter_model", "tandem_model")
# over gRPC through the cloud's gateway, Ray Serve and the link shaper; `tandem_grpc_tls` adds TLS
# and a device token (a second gateway in front of the same Serve proxy); `tandem_grpc_model`
# drafts with the model alone (--draft-len as given); `tandem_grpc_seq` is the old sequential
# protocol: the model alone, k = SEQ_DRAFT_LEN every round, one round after the other (no pipelining);
# `tandem_grpc_alt` is `tandem_grpc` that also prepares a round for the likeliest other verdict (greedy);
# `tandem_grpc_chain` is `tandem_grpc` with draft trees turned off (chains only); `tandem_grpc_nopipe`
# is `tandem_grpc` without pipelining (round 1 drafted, each next round drafted after the verdict);
# `tandem_grpc_ahead` drafts rounds ahead in sampling mode too (the edge does not by default)
SPECULATIVE_NETWORK_METHODS = ("tandem_grpc", "tandem_grpc_model", "tandem_grpc_seq", "tandem_grpc_alt",
                               "tandem_grpc_chain", "tandem_grpc_nopipe", "tandem_grpc_ahead", "tandem_grpc_tls")
NETWORK_METHODS = (*SPECULATIVE_NETWORK_METHODS, "cloud_stream")
SEQ_DRAFT_LEN = 4
ALL_METHODS = METHODS + NO_LOOKUP_METHODS + NETWORK_METHODS
# methods whose greedy output must equal the target's
CLAIMS_TARGET_OUTPUT = {"assisted", "cloud_only", "tandem", "tandem_model", *NETWORK_METHODS}
# methods that run Tandem's engine, whose greedy output must equal its cloud-only path bit for bit
CLAIMS_CLOUD_ONLY_OUTPUT = CLAIMS_TARGET_OUTPUT - {"assisted"}
SUITES = ("methods", "orchestrator", "fallback", "cloud-scale", "chat-turns")
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_RTTS_MS = "0,20,50,100,200"
# cloud-scale: the figures are for 32-64 new tokens; chat-turns: each answer adds about 40 tokens to the next turn
SUITE_MAX_NEW_TOKENS = {"cloud-scale": 32, "chat-turns": 40}


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    prompt: str | None
    messages: list[dict] | None


def default_prompts_path() -> Path:
    return Path(str(resources.files("tandem") / "data" / "prompts.jsonl"))


def load_prompts(path: Path) -> list[BenchPrompt]:
    """Read a JSONL prompt file; every line needs id, category and one of prompt or messages."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise CliError(f"cannot read prompts file {path}: {exc.strerror}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CliError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not {"id", "category"} <= item.keys():
            raise CliError(f"{path}:{n}: each line needs 'id' and 'category'")
        if ("prompt" in item) == ("messages" in item):
            raise CliError(f"{path}:{n}: give exactly one of 'prompt' or 'messages'")
        prompts.append(BenchPrompt(str(item["id"]), str(item["category"]), item.get("prompt"), item.get("messages")))
    if not prompts:
        raise CliError(f"{path}: no prompts")
    return prompts


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark generation methods side by side",
                       description="Run generation methods side by side on a prompt set and report speed and exactness.")
    p.add_argument("--suite", choices=SUITES, default="methods",
                   help="methods: generation methods side by side (default); orchestrator: the orchestrator's "
                        "overhead on the local route vs the edge node directly; fallback: the stall when the link "
                        "is cut or black-holed mid-answer; cloud-scale: concurrent sessions against the Ray Serve "
                        "deployment on a local two-node cluster, from replayed drafts (default) or real edge "
                        "processes (--load); chat-turns: a 6-turn conversation through the orchestrator on the "
                        "speculative route, with TTFT and the cloud's and the drafter's prefill per turn")
    p.add_argument("--repeats", type=int, default=3, help="orchestrator suite: runs per prompt and path")
    p.add_argument("--models", choices=("real", "tiny"), default="real",
                   help="cloud-scale and chat-turns suites: the fetched pair, or tiny random models (a quick check)")
    p.add_argument("--load", default="replay", help="cloud-scale suite: replay (recorded drafts sent by light "
                                                    "clients, no drafter), edges (real edge processes), or "
                                                    "replay,edges for both rows")
    p.add_argument("--sessions", default="1,2,4,8,16", help="cloud-scale suite: concurrent sessions per row")
    p.add_argument("--replicas", default="1,2", help="cloud-scale suite: Serve replica counts (at most 2)")
    p.add_argument("--max-sessions", type=int, default=None,
                   help="cloud-scale suite: sessions per replica (default: the deployment's own admission)")
    p.add_argument("--duration", type=float, default=30.0,
                   help="cloud-scale suite, replay load: seconds each row keeps its N clients busy, each "
                        "replaying one prompt after another (closed loop; throughput counted inside the "
                        "window); 0 = one session per client, all started at once")
    p.add_argument("--replay-file", type=Path, default=None,
                   help="cloud-scale suite: keep (or reuse) the recorded drafts in this JSON file "
                        "(default: the run's temporary folder)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="JSONL prompts (default: the shipped set: code, prose, chat, edit, personal)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="per answer (default: " + ", ".join(f"{k} {v}" for k, v in SUITE_MAX_NEW_TOKENS.items())
                        + f", else {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="target (and assistant) dtype")
    p.add_argument("--draft-len", type=int, default=4,
                   help="draft tokens per round (k); 0: chosen each round (tandem_core.lookup); the *_seq methods "
                        f"always use {SEQ_DRAFT_LEN}")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: the in-process four)")
    p.add_argument("--rtt-ms", default=DEFAULT_RTTS_MS,
                   help=f"link RTTs for the networked methods, comma-separated (default: {DEFAULT_RTTS_MS})")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="methods suite: 0 = greedy (default); > 0 samples every method (with --seed); "
                        "chat-turns: > 0 samples every turn without a seed, as a chat client does")
    p.add_argument("--seed", type=int, default=0, help="methods suite, with --temperature: the seed of every answer")
    p.add_argument("--split-cores", action="store_true",
                   help="methods suite: the edge (drafter) on one CPU, the cloud (the replica's target) and the "
                        "target alone on another, one thread each; needs 2 CPUs")
    p.add_argument("--categories", default=None, help="comma-separated categories to keep")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts per category")
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--warm-prompts", action="store_true",
                   help="before timing a prompt, run it once untimed (warm-up tokens; a network method when "
                        "there is one) so that every method sees the same caches (the cloud's prefix cache, the "
                        "drafter's retained KV): for side-by-side ratios such as tandem_grpc vs tandem_grpc_tls "
                        "or tandem_grpc_model, where the second runner of a prompt would otherwise get the first "
                        "one's cached prefill; compare decode tok/s with the target, whose prefill is not cached")
    p.add_argument("--handshake-repeats", type=int, default=20,
                   help="connections per measurement of the TLS set-up (with --methods ...,tandem_grpc_tls)")
    p.add_argument("--target", type=Path, default=None, help="target model folder (default: fetched pair)")
    p.add_argument("--drafter", type=Path, default=None, help="ONNX drafter folder (default: fetched pair)")
    p.add_argument("--drafter-hf", type=Path, default=None, help="torch drafter folder for assisted generation")
    p.set_defaults(func=run)


def _parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise CliError(f"--methods: unknown {unknown or 'empty'}; choose from {','.join(ALL_METHODS)}")
    return methods


def _parse_rtts(text: str) -> list[float]:
    try:
        rtts = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--rtt-ms: expected comma-separated numbers, got {text!r}") from None
    if not rtts or not all(math.isfinite(r) and r >= 0 for r in rtts):
        raise CliError(f"--rtt-ms: give one or more finite RTTs >= 0, got {text!r}")
    return rtts


def _at_least(flag: str, value: int | None, least: int) -> None:
    if value is not None and value < least:
        raise CliError(f"{flag}: must be >= {least}, got {value}")


def _finite(flag: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise CliError(f"{flag}: must be a finite number >= 0, got {value}")


def check_args(args: argparse.Namespace) -> None:
    """Every numeric flag, whatever the suite: CliError (exit 2, one line) before anything starts."""
    for flag, value, least in (("--repeats", args.repeats, 1), ("--max-sessions", args.max_sessions, 1),
                               ("--max-new-tokens", args.max_new_tokens, 1), ("--limit", args.limit, 1),
                               ("--warmup-tokens", args.warmup_tokens, 0),
                               ("--handshake-repeats", args.handshake_repeats, 1)):
        _at_least(flag, value, least)
    if not 0 <= args.draft_len <= 16:
        raise CliError(f"--draft-len: must be in [0, 16] (0: adaptive), got {args.draft_len}")
    _finite("--duration", args.duration)
    _finite("--temperature", args.temperature)
    if not 0 <= args.seed < 2**63:
        raise CliError(f"--seed: must be in [0, 2**63), got {args.seed}")
    _parse_rtts(args.rtt_ms)
    if args.split_cores and args.suite != "methods":
        raise CliError("--split-cores applies to the methods suite only")
    if args.suite == "cloud-scale":
        from tandem.bench.scale import check_args as check_scale

        check_scale(args)


def _model_dirs(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    if args.target and args.drafter:
        return args.target, args.drafter, args.drafter_hf or args.drafter
    from tandem.models import registry as models

    try:
        models.require_pair()
    except models.ModelsMissing as exc:
        raise CliError(str(exc)) from None
    return (args.target or models.target_dir(), args.drafter or models.drafter_onnx_dir(),
            args.drafter_hf or models.drafter_hf_dir())


def _select(prompts: list[BenchPrompt], categories: str | None, limit: int | None) -> list[BenchPrompt]:
    keep = {c.strip() for c in categories.split(",")} if categories else None
    out, seen = [], {}
    for p in prompts:
        if keep is not None and p.category not in keep:
            continue
        seen[p.category] = seen.get(p.category, 0) + 1
        if limit is None or seen[p.category] <= limit:
            out.append(p)
    if not out:
        raise CliError("no prompts left after --categories/--limit")
    return out


def _generate(pair: Any, method: str, ids: list[int], params: Any, args: argparse.Namespace, n: int,
              remote: Any = None) -> Any:
    if method in SPECULATIVE_NETWORK_METHODS:
        k = SEQ_DRAFT_LEN if method == "tandem_grpc_seq" else args.draft_len
        return remote.speculative(ids, params, draft_len=k, max_new_tokens=n, method=method)
    if method == "cloud_stream":
        return remote.cloud_stream(ids, params, max_new_tokens=n)
    if method == "target":
        return pair.target_generate(ids, params, max_new_tokens=n)
    if method == "assisted":
        return pair.assisted_generate(ids, params, draft_len=args.draft_len or SEQ_DRAFT_LEN, max_new_tokens=n)
    if method in ("drafter", "drafter_model"):
        return pair.drafter_generate(ids, params, max_new_tokens=n, lookup=method == "drafter")
    if method == "cloud_only":
        return pair.cloud_only_generate(ids, params, max_new_tokens=n)
    return pair.speculative_generate(ids, params, draft_len=args.draft_len, max_new_tokens=n,
                                     lookup=method == "tandem")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    from cloud_node.scorer import encode_prompt
    from tandem import paths
    from tandem.ops import procs
    from tandem.pair import LocalPair

    if args.max_new_tokens is None:
        args.max_new_tokens = SUITE_MAX_NEW_TOKENS.get(args.suite, DEFAULT_MAX_NEW_TOKENS)
    if args.suite == "orchestrator":
        from tandem.bench.orchestrator import run_suite

        return run_suite(args, _select(load_prompts(args.prompts or default_prompts_path()), args.categories,
                                       args.limit))
    if args.suite == "fallback":
        from tandem.bench.fallback import run_suite as run_fallback

        return run_fallback(args)
    if args.suite == "cloud-scale":
        from tandem.bench.scale import run_suite as run_scale

        return run_scale(args)
    if args.suite == "chat-turns":
        from tandem.bench.chat_turns import run_suite as run_chat

        return run_chat(args)
    methods = _parse_methods(args.methods)
    rtts = _parse_rtts(args.rtt_ms)
    params = _sampling(args)
    placement = _placement(args)
    machine = machine_info()  # now: --split-cores narrows this process's affinity later
    prompts = _select(load_prompts(args.prompts or default_prompts_path()), args.categories, args.limit)
    target, drafter, drafter_hf = _model_dirs(args)
    _progress(f"loading models (target {args.dtype}): {target}, {drafter}")
    t0 = time.perf_counter()
    pair = LocalPair(target, None if placement else drafter, dtype=args.dtype,
                     drafter_hf_dir=drafter_hf if "assisted" in methods else None)
    if placement is not None:
        placement.limit_threads(pair, drafter)
    _progress(f"models loaded in {time.perf_counter() - t0:.1f} s")
    encoded = [encode_prompt(pair.tokenizer, p.prompt, p.messages) for p in prompts]
    with procs.Stack(paths.tandem_home() / "logs" / "bench") as stack:
        remote = None
        if any(m in NETWORK_METHODS for m in methods):
            from tandem.bench.remote import RemoteStack

            remote = RemoteStack(stack, pair.drafter, dtype=args.dtype, model_dir=args.target, progress=_progress,
                                 tls="tandem_grpc_tls" in methods,
                                 cloud_cpu=placement.plan.cloud if placement is not None else None)
            if placement is not None:
                placement.cloud = remote.pinning()
        runs = _run_all(pair, remote, methods, rtts, prompts, encoded, args, params, placement)
        handshake = None
        if "tandem_grpc_tls" in methods:
            from tandem.bench.remote import handshake_figures

            _progress("connection set-up, plaintext vs TLS, new vs reused connections ...")
            if placement is not None:
                placement.enter("tandem_grpc_tls")
            handshake = handshake_figures(remote, encoded[0], args.handshake_repeats, _progress)
    rows = aggregate(runs)
    print(format_table(rows))
    if handshake is not None:
        print(format_handshake(handshake))
    if args.json:
        extra = {"sampling": _describe_sampling(params),
                 "split_cores": placement.describe() if placement is not None else None}
        _write_json(args, rows, runs, methods, rtts, len(prompts), target, drafter, handshake, machine=machine,
                    extra=extra)
    return 0


def _sampling(args: argparse.Namespace) -> Any:
    from tandem_core.sampling import SamplingParams

    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise CliError(f"--temperature: must be a finite number >= 0, got {args.temperature}")
    if not 0 <= args.seed < 2**63:
        raise CliError(f"--seed: must be in [0, 2**63), got {args.seed}")
    # greedy: the goal figures and identical_to_target are greedy
    return SamplingParams(temperature=args.temperature, seed=args.seed) if args.temperature else SamplingParams()


def _describe_sampling(params: Any) -> Any:
    if params.greedy:
        return "greedy"
    return {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p, "seed": params.seed}


def _placement(args: argparse.Namespace) -> Placement | None:
    """--split-cores: the plan from this process's CPUs, checked before anything loads."""
    if not args.split_cores:
        return None
    try:
        return Placement(plan_cores(os.sched_getaffinity(0)))
    except ValueError as exc:
        raise CliError(str(exc)) from None


def format_handshake(h: dict[str, Any]) -> str:
    lines = ["connection set-up at RTT 0 (median / p90 ms)   plaintext new   TLS new   TLS reused   plaintext reused"]
    for what, label in (("health", "health check"), ("open", "session open (prefill cached)")):
        cells = [h[f"{what}_{k}"] for k in ("plain_new_connection", "tls_new_connection", "tls_reused_connection",
                                             "plain_reused_connection")]
        lines.append(f"{label:<46}" + "".join(f"{c['median_ms']:>7.1f}/{c['p90_ms']:<6.1f}" for c in cells))
    tls_cost = h["health_tls_new_connection"]["median_ms"] - h["health_plain_new_connection"]["median_ms"]
    reuse = h["open_tls_new_connection"]["median_ms"] - h["open_tls_reused_connection"]["median_ms"]
    lines.append(f"TLS handshake adds {tls_cost:.1f} ms to a new connection; reusing the connection saves "
                 f"{reuse:.1f} ms per session open")
    return "\n".join(lines)


def _variants(methods: list[str], rtts: list[float]) -> list[tuple[str, float | None]]:
    """(method, rtt) pairs: networked methods once per RTT, the others once."""
    return [(m, r) for m in methods for r in (rtts if m in NETWORK_METHODS else [None])]


def _run_all(pair: Any, remote: Any, methods: list[str], rtts: list[float], prompts: list[BenchPrompt],
             encoded: list[list[int]], args: argparse.Namespace, params: Any,
             placement: Placement | None = None) -> list[Run]:
    def generate(method: str, ids: list[int], n: int) -> Any:
        if placement is not None:
            placement.enter(method)  # outside the timed call
        return _generate(pair, method, ids, params, args, n, remote)

    variants = _variants(methods, rtts)
    for method in methods:  # warm-up: first-call allocations and lazy init stay out of the figures
        _progress(f"warm-up: {method}")
        generate(method, encoded[0], args.warmup_tokens)
    runs: list[Run] = []
    total = len(prompts) * len(variants)
    for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
        order = variants[i % len(variants):] + variants[: i % len(variants)]
        if args.warm_prompts:
            # A network method fills both caches (the cloud's prefix cache and the drafter's
            # retained KV); an in-process run has only the drafter's.
            warm = next((v for v in order if v[1] is not None), order[0])
            if warm[1] is not None:
                remote.set_rtt(warm[1])
            generate(warm[0], ids, args.warmup_tokens)
        results = {}
        for method, rtt in order:
            if rtt is not None:
                remote.set_rtt(rtt)
            results[(method, rtt)] = generate(method, ids, args.max_new_tokens)
        # sampled answers differ from method to method: no identity is claimed
        base = results.get(("target", None)) if params.greedy else None
        own = results.get(("cloud_only", None)) if params.greedy else None
        if own is None and params.greedy and any(m in CLAIMS_CLOUD_ONLY_OUTPUT for m, _ in order):
            own = generate("cloud_only", ids, args.max_new_tokens)  # the reference, untimed
        for method, rtt in order:
            r = results[(method, rtt)]
            same = r.tokens == base.tokens if base is not None and method in CLAIMS_TARGET_OUTPUT else None
            same_own = r.tokens == own.tokens if own is not None and method in CLAIMS_CLOUD_ONLY_OUTPUT else None
            runs.append(Run(prompt.id, prompt.category, r, same, rtt, same_own))
            label = method if rtt is None else f"{method}@{rtt:g}ms"
            _progress(f"[{len(runs)}/{total}] {label:<20} {prompt.id:<16} {len(r.tokens):4d} tok "
                      f"{len(r.tokens) / r.wall_s:6.2f} tok/s  ttft {1000 * r.ttft_s:6.0f} ms"
                      + ("" if same is None else f"  identical={same}")
                      + ("" if same_own is None else f"  identical_to_cloud_only={same_own}"))
    return runs


def _write_json(args: argparse.Namespace, rows: list[dict], runs: list[Run], methods: list[str], rtts: list[float],
                n_prompts: int, target: Path, drafter: Path, handshake: dict[str, Any] | None = None, *,
                machine: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> None:
    """`extra`: more config entries (sampling, split_cores)."""
    config = {"max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "draft_len": args.draft_len,
              "methods": methods, "rtt_ms": rtts if any(m in NETWORK_METHODS for m in methods) else None,
              "prompts": str(args.prompts or default_prompts_path()), "n_prompts": n_prompts, "sampling": "greedy",
              "warm_prompts": bool(args.warm_prompts),
              "target": str(target), "drafter": str(drafter)} | (extra or {})
    per_prompt = [{"method": r.result.method, "rtt_ms": r.rtt_ms, "prompt_id": r.prompt_id, "category": r.category,
                   "tokens": len(r.result.tokens), "wall_s": r.result.wall_s, "ttft_s": r.result.ttft_s,
                   "identical_to_target": r.identical_to_target,
                   "identical_to_cloud_only": r.identical_to_cloud_only} for r in runs]
    doc = {"machine": machine or machine_info(), "config": config, "results": rows, "runs": per_prompt}
    if handshake is not None:
        doc["tls_handshake"] = handshake
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    _progress(f"wrote {args.json}")

