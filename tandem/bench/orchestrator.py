"""`tandem bench --suite orchestrator`: what the orchestrator costs on the local route.

It starts a real edge node (the ONNX drafter) and a real orchestrator as processes, then runs
each prompt through both paths side by side, alternating which goes first: the edge node's
Generate directly (EDGE_MODE_LOCAL) and the orchestrator's Generate through the SDK (route
local). Both are timed the same way on the client: tokens / (last token - request sent), and
TTFT. It prints medians per path, the ratio orchestrator / direct (the goal is >= 0.95) and
whether both paths produced the same greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tandem.bench.report import progress as _progress
from tandem.cli.main import CliError


def _direct(stub: Any, messages: list[dict[str, str]], n: int) -> tuple[float, float, list[int]]:
    from protos.tandem.v1 import common_pb2, edge_pb2

    req = edge_pb2.EdgeGenerateRequest(messages=[common_pb2.ChatMessage(**m) for m in messages], max_new_tokens=n,
                                       mode=edge_pb2.EDGE_MODE_LOCAL)
    t0, first, tokens = time.perf_counter(), None, []
    for msg in stub.Generate(req, timeout=600):
        if msg.WhichOneof("kind") == "delta" and msg.delta.tokens:
            first = first or time.perf_counter()
            tokens += msg.delta.tokens
    end = time.perf_counter()
    return len(tokens) / (end - t0), 1000 * ((first or end) - t0), tokens


def _via_orchestrator(client: Any, messages: list[dict[str, str]], n: int) -> tuple[float, float, list[int]]:
    t0, first, tokens = time.perf_counter(), None, []
    for delta in client.generate(messages=messages, route="local", max_new_tokens=n):
        if delta.tokens:
            first = first or time.perf_counter()
            tokens += delta.tokens
    end = time.perf_counter()
    return len(tokens) / (end - t0), 1000 * ((first or end) - t0), tokens


def run_suite(args: argparse.Namespace, prompts: list[Any]) -> int:
    import grpc

    from protos.tandem.v1 import edge_pb2_grpc
    from tandem import paths
    from tandem.models import registry as models
    from tandem.ops import procs
    from tandem_sdk import Client

    drafter = args.drafter or models.drafter_onnx_dir()
    if not (Path(drafter) / "genai_config.json").exists():
        raise CliError(f"no ONNX drafter at {drafter}; run `tandem models fetch`")
    reps, n, py = max(args.repeats, 1), args.max_new_tokens, sys.executable
    rows: list[dict[str, Any]] = []
    with procs.Stack(paths.tandem_home() / "logs" / "bench-orchestrator") as stack:
        edge = stack.start("edge", [py, "-m", "tandem", "serve", "edge", "--port", "0", "--drafter", str(drafter)],
                           timeout_s=180)
        orch = stack.start("orchestrator", [py, "-m", "tandem", "serve", "orchestrator", "--edge", edge.fields["grpc"],
                                            "--port", "0", "--http-port", "-1", "--no-personal"], timeout_s=120)
        procs.wait_healthy(orch.fields["grpc"], timeout_s=60)
        _progress(f"edge {edge.fields['grpc']}, orchestrator {orch.fields['grpc']}; {len(prompts)} prompts x {reps}")
        with grpc.insecure_channel(edge.fields["grpc"]) as channel, Client(orch.fields["grpc"]) as client:
            stub = edge_pb2_grpc.EdgeNodeStub(channel)
            warm = [{"role": "user", "content": "Say hello."}]
            _direct(stub, warm, 8), _via_orchestrator(client, warm, 8)
            for i, p in enumerate(prompts):
                messages = p.messages or [{"role": "user", "content": p.prompt}]
                for r in range(reps):
                    order = [("direct", _direct, stub), ("orchestrator", _via_orchestrator, client)]
                    for path, fn, target in (order if r % 2 == 0 else order[::-1]):
                        tps, ttft, tokens = fn(target, messages, n)
                        rows.append(dict(prompt=p.id, category=p.category, rep=r, path=path, tokens_per_s=tps,
                                         ttft_ms=ttft, tokens=tokens))
                    _progress(f"prompt {i + 1}/{len(prompts)} {p.id} rep {r + 1}/{reps}: "
                              + ", ".join(f"{x['path']} {x['tokens_per_s']:.1f} tok/s" for x in rows[-2:]))
    summary = _summarize(rows)
    print(_format(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"suite": "orchestrator", "max_new_tokens": n, "repeats": reps,
                                         "summary": summary, "runs": rows}, indent=2))
        _progress(f"wrote {args.json}")
    return 0


def _summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {path: [r for r in rows if r["path"] == path] for path in ("direct", "orchestrator")}
    med = {path: statistics.median(r["tokens_per_s"] for r in rs) for path, rs in by.items()}
    ttft = {path: statistics.median(r["ttft_ms"] for r in rs) for path, rs in by.items()}
    pairs = {(r["prompt"], r["rep"]): r for r in by["direct"]}
    ratios = [o["tokens_per_s"] / pairs[(o["prompt"], o["rep"])]["tokens_per_s"] for o in by["orchestrator"]]
    identical = all(o["tokens"] == pairs[(o["prompt"], o["rep"])]["tokens"] for o in by["orchestrator"])
    return {"direct_tokens_per_s": med["direct"], "orchestrator_tokens_per_s": med["orchestrator"],
            "ratio_median": statistics.median(ratios), "ratio_of_medians": med["orchestrator"] / med["direct"],
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "direct_ttft_ms": ttft["direct"], "orchestrator_ttft_ms": ttft["orchestrator"],
            "identical_tokens": identical, "pairs": len(ratios)}


def _format(s: dict[str, Any]) -> str:
    return "\n".join([
        "path          tokens/s (median)   TTFT ms (median)",
        f"direct edge   {s['direct_tokens_per_s']:>17.2f}   {s['direct_ttft_ms']:>16.1f}",
        f"orchestrator  {s['orchestrator_tokens_per_s']:>17.2f}   {s['orchestrator_ttft_ms']:>16.1f}",
        f"orchestrator / direct tokens/s: median {s['ratio_median']:.3f} (min {s['ratio_min']:.3f}, "
        f"max {s['ratio_max']:.3f}, {s['pairs']} pairs); ratio of the medians {s['ratio_of_medians']:.3f}",
        f"overhead {100 * (1 - min(s['ratio_median'], s['ratio_of_medians'])):.1f}% at most (goal <= 5%); "
        f"identical tokens: {'yes' if s['identical_tokens'] else 'NO'}",
    ])
