"""`tandem demo`: a short speculative generation on the default pair, streamed, with statistics.

Guarantees: the answer is printed while it is generated (each verified round as it commits), then
the statistics; a missing model or a bad flag is a one-line error with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from tandem.cli import CliError

DEFAULT_PROMPT = "Write a Python function that checks whether a string is a palindrome."


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="stream a speculative answer on the default pair, then its statistics")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--draft-len", type=int, default=4)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tandem import models
    from tandem_core.sampling import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.max_new_tokens < 1 or args.draft_len < 1:
        raise CliError("--max-new-tokens and --draft-len must be >= 1")
    try:
        models.require_pair()
    except models.ModelsMissing as exc:
        raise CliError(str(exc)) from None
    from tandem.local import LocalPair, encode_prompt

    t0 = time.perf_counter()
    print(f"loading the drafter (ONNX int4) and the target ({args.dtype}) ...", file=sys.stderr, flush=True)
    pair = LocalPair(models.target_dir(), models.drafter_onnx_dir(), dtype=args.dtype)
    print(f"loaded in {time.perf_counter() - t0:.1f} s\n", file=sys.stderr, flush=True)
    ids = encode_prompt(pair.tokenizer, messages=[{"role": "user", "content": args.prompt}])
    print(f">>> {args.prompt}\n", flush=True)
    shown: list[int] = []
    text_so_far = ""

    def on_tokens(tokens: Any) -> None:
        nonlocal text_so_far
        shown.extend(tokens)
        text = pair.decode(shown)
        sys.stdout.write(text[len(text_so_far):])
        sys.stdout.flush()
        text_so_far = text

    result = pair.speculative_generate(ids, params, draft_len=args.draft_len, max_new_tokens=args.max_new_tokens,
                                       on_tokens=on_tokens)
    stats = result.stats
    n = len(result.tokens)
    print("\n")
    print(f"tokens {n}  |  {n / result.wall_s:.2f} tok/s  |  TTFT {1000 * result.ttft_s:.0f} ms")
    print(f"acceptance {stats.acceptance_rate or 0:.1%}  |  mean accepted length {stats.mean_accepted_len or 0:.2f}"
          f"  |  target forwards/token {stats.target_forwards_per_token or 0:.3f}  |  rounds {stats.rounds}")
    print(f"CPU s/token: edge {result.edge_cpu_s / n:.3f}, cloud {result.cloud_cpu_s / n:.3f}")
    return 0
