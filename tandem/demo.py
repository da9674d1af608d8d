"""`tandem demo`: the whole system as separate processes, streaming one answer.

It starts the cloud node (Ray Serve), the link shaper and the edge node, each a process on free
loopback ports with health checks before use, then streams a speculative answer to a sample
prompt through the edge node and prints its statistics and the start-up time. On exit, error or
Ctrl-C it stops every process it started, Ray included. `--in-process` runs drafter and target
in this process instead (no network), for comparison.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tandem.cli import CliError

DEFAULT_PROMPT = "Write a Python function that checks whether a string is a palindrome."


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="start cloud, link shaper and edge as processes and stream an answer")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--draft-len", type=int, default=4)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="target dtype")
    p.add_argument("--link-rtt-ms", type=float, default=0.0, help="round-trip time the link shaper adds")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--in-process", action="store_true", help="no processes: drafter and target in this process")
    p.set_defaults(func=run)


def _params(args: argparse.Namespace) -> Any:
    from tandem_core.sampling import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.max_new_tokens < 1 or not 1 <= args.draft_len <= 16:
        raise CliError("--max-new-tokens must be >= 1 and --draft-len in [1, 16]")
    if args.link_rtt_ms < 0:
        raise CliError("--link-rtt-ms must be >= 0")
    return params


def run(args: argparse.Namespace) -> int:
    from tandem import models

    params = _params(args)
    try:
        models.require_pair()
    except models.ModelsMissing as exc:
        raise CliError(str(exc)) from None
    if args.in_process:
        return _run_in_process(args, params)
    return _run_processes(args, params)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_processes(args: argparse.Namespace, params: Any) -> int:
    from tandem import paths, procs

    log_dir = paths.tandem_home() / "logs" / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.perf_counter()
    py = sys.executable
    with procs.Stack(log_dir) as stack:
        try:
            _say(f"starting the cloud node (Ray Serve, target {args.dtype}) ... logs in {log_dir}")
            cloud = stack.start("cloud", [py, "-m", "tandem", "serve", "cloud", "--port", "0", "--dtype", args.dtype],
                                timeout_s=600)
            _say(f"  cloud verifier at {cloud.fields['grpc']} ({time.perf_counter() - t0:.1f} s)")
            shaper = stack.start("netshape", [py, "-m", "netshape", "--listen", "127.0.0.1:0", "--upstream",
                                              cloud.fields["grpc"], "--rtt-ms", str(args.link_rtt_ms),
                                              "--control", "127.0.0.1:0"], timeout_s=60, ready=r"^control=")
            _say(f"  link shaper at {shaper.fields['listen']} (RTT +{args.link_rtt_ms:g} ms)")
            edge = stack.start("edge", [py, "-m", "tandem", "serve", "edge", "--port", "0", "--cloud",
                                        shaper.fields["listen"], "--draft-len", str(args.draft_len)], timeout_s=120)
            procs.wait_healthy(edge.fields["grpc"], timeout_s=60)
            _say(f"  edge node at {edge.fields['grpc']}")
            _say(f"all processes healthy; start-up took {time.perf_counter() - t0:.1f} s\n")
            _stream_answer(edge.fields["grpc"], args, params)
        except procs.ChildFailed as exc:
            raise CliError(str(exc)) from None
        except KeyboardInterrupt:
            _say("\ninterrupted; stopping every process")
            return 130
        finally:
            _say("stopping the processes ...")
    return 0


def _stream_answer(edge_address: str, args: argparse.Namespace, params: Any) -> None:
    import grpc

    from protos.tandem.v1 import common_pb2, edge_pb2, edge_pb2_grpc

    sampling = common_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        sampling.seed = params.seed
    request = edge_pb2.EdgeGenerateRequest(messages=[common_pb2.ChatMessage(role="user", content=args.prompt)],
                                           sampling=sampling, max_new_tokens=args.max_new_tokens,
                                           mode=edge_pb2.EDGE_MODE_SPECULATIVE, draft_len=args.draft_len)
    print(f">>> {args.prompt}\n", flush=True)
    stats = None
    with grpc.insecure_channel(edge_address) as channel:
        try:
            for msg in edge_pb2_grpc.EdgeNodeStub(channel).Generate(request, timeout=1800):
                if msg.WhichOneof("kind") == "delta":
                    sys.stdout.write(msg.delta.text)
                    sys.stdout.flush()
                else:
                    stats = msg.stats
        except grpc.RpcError as exc:
            raise CliError(f"generation failed: {exc.code().name}: {exc.details()}") from None
    print("\n")
    if stats is not None:
        _print_stats(stats.generated_tokens, stats.tokens_per_s, stats.ttft_ms, stats.acceptance_rate,
                     stats.mean_accepted_len, stats.target_forwards, stats.rounds, stats.edge_cpu_s)
        print(f"bytes up {stats.bytes_up:,}  |  down {stats.bytes_down:,}  |  per round "
              f"{(stats.bytes_up + stats.bytes_down) / max(stats.rounds, 1):.0f}  |  resumes {stats.resumes}")


def _print_stats(n: int, tok_s: float, ttft_ms: float, acceptance: float, tau: float, forwards: int, rounds: int,
                 edge_cpu_s: float) -> None:
    print(f"tokens {n}  |  {tok_s:.2f} tok/s  |  TTFT {ttft_ms:.0f} ms")
    print(f"acceptance {acceptance:.1%}  |  mean accepted length {tau:.2f}  |  target forwards/token "
          f"{forwards / max(n, 1):.3f}  |  rounds {rounds}  |  edge CPU s/token {edge_cpu_s / max(n, 1):.3f}")


def _run_in_process(args: argparse.Namespace, params: Any) -> int:
    from tandem import models
    from tandem.local import LocalPair, encode_prompt

    t0 = time.perf_counter()
    _say(f"loading the drafter (ONNX int4) and the target ({args.dtype}) in this process ...")
    pair = LocalPair(models.target_dir(), models.drafter_onnx_dir(), dtype=args.dtype)
    _say(f"loaded in {time.perf_counter() - t0:.1f} s\n")
    ids = encode_prompt(pair.tokenizer, messages=[{"role": "user", "content": args.prompt}])
    print(f">>> {args.prompt}\n", flush=True)
    from edge_node.text import TextStream

    text = TextStream(pair.decode)

    def show(tokens: Any) -> None:
        sys.stdout.write(text.push(tokens))
        sys.stdout.flush()

    result = pair.speculative_generate(ids, params, draft_len=args.draft_len, max_new_tokens=args.max_new_tokens,
                                       on_tokens=show)
    sys.stdout.write(text.flush())
    print("\n")
    s = result.stats
    n = len(result.tokens)
    _print_stats(n, n / result.wall_s, 1000 * result.ttft_s, s.acceptance_rate or 0.0, s.mean_accepted_len or 0.0,
                 s.target_forwards, s.rounds, result.edge_cpu_s or 0.0)
    return 0
