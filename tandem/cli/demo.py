"""`tandem demo`: the whole system as separate processes, streaming one answer.

It starts the cloud node (Ray Serve), the link shaper, the edge node and the orchestrator, each a
process on free loopback ports with health checks before use, then streams an answer to a sample
prompt through the client SDK and the orchestrator (which routes it; speculative when the link is
up) and prints the route, its reason and the statistics. Every hop runs over TLS with credentials
made under TANDEM_HOME/secure (`local_stack`'s secure mode) unless `--insecure` is given. On exit, error or
Ctrl-C it stops every process it started, Ray included. `--in-process` runs drafter and target
in this process instead (no network), for comparison.

`--web` starts the same stack and, instead of the sample answer, prints the web console's URL
(the orchestrator's HTTP port; with the API key in the URL's fragment when secure) and opens it
in a browser when this machine has a display; the stack runs until Ctrl-C, then stops. The
console's demo buttons cut, black-hole, slow and restore the link through the shaper.

The sample answer (greedy, about 180 tokens with the Qwen2.5-Coder pair) ends by itself within
the default budget of 256 tokens; an answer that reaches the budget says so.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import signal
import sys
import time
import webbrowser
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from tandem.cli.main import CliError

DEFAULT_PROMPT = "Write a Python function that checks whether a string is a palindrome."


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="start cloud, link shaper, edge and orchestrator as processes and stream an answer")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="answer budget; the sample answer ends by itself well before it (default 256)")
    p.add_argument("--draft-len", type=int, default=4)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="target dtype")
    p.add_argument("--link-rtt-ms", type=float, default=0.0, help="round-trip time the link shaper adds")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--route", choices=("auto", "local", "speculative", "cloud"), default="auto",
                   help="the orchestrator's route for the sample request")
    p.add_argument("--in-process", action="store_true", help="no processes: drafter and target in this process")
    p.add_argument("--web", action="store_true",
                   help="start the stack and serve the web console instead of the sample answer: prints its URL, "
                        "opens it when there is a display, runs until Ctrl-C")
    from tandem.cli.stack import add_secure_flags

    add_secure_flags(p)
    p.set_defaults(func=run)


def _params(args: argparse.Namespace) -> Any:
    from tandem_core.sampling import SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.max_new_tokens < 1 or not 1 <= args.draft_len <= 16:
        raise CliError("--max-new-tokens must be >= 1 and --draft-len in [1, 16]")
    if not 0 <= args.link_rtt_ms < math.inf:  # nan too: it reached the link shaper, after the cloud loaded
        raise CliError(f"--link-rtt-ms must be a finite number >= 0, got {args.link_rtt_ms}")
    return params


def run(args: argparse.Namespace) -> int:
    from tandem.models import registry as models

    params = _params(args)
    try:
        models.require_pair()
    except models.ModelsMissing as exc:
        raise CliError(str(exc)) from None
    if args.in_process:
        if args.web:
            raise CliError("--web needs the processes (the console is the orchestrator's); drop --in-process")
        return _run_in_process(args, params)
    return _run_processes(args, params)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_processes(args: argparse.Namespace, params: Any) -> int:
    from tandem import paths
    from tandem.ops import local_stack, procs

    log_dir = paths.tandem_home() / "logs" / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    signal.signal(signal.SIGTERM, _interrupt)
    opts = local_stack.StackConfig(dtype=args.dtype, link_rtt_ms=args.link_rtt_ms, draft_len=args.draft_len,
                                    grpc_port=0, http_port=0, secure=args.secure)
    with procs.Stack(log_dir) as stack:
        try:
            _say(f"logs in {log_dir}")
            secrets = local_stack.secrets_for(opts)
            children = local_stack.launch(stack.start, opts, _say, secrets)
            _say("")
            if args.web:
                serve_console(children, secrets)
            else:
                _stream_answer(children["orchestrator"].fields["grpc"], args, params,
                               local_stack.sdk_options(secrets))
        except procs.ChildFailed as exc:
            raise CliError(str(exc)) from None
        except KeyboardInterrupt:
            _say("\ninterrupted; stopping every process")
            return 130
        finally:
            _say("stopping the processes ...")
    return 0


def serve_console(children: dict[str, Any], secrets: Any, *, opener: Callable[[str], object] | None = None,
                  poll_s: float = 1.0) -> None:
    """Print the console's URL, open it when there is a display (`opener`, default `webbrowser`),
    then wait until Ctrl-C (returns) or until a process of the stack ends (CliError)."""
    from tandem.ops import local_stack
    from tandem.security import read_secret

    key = read_secret(file=secrets.api_key, what="api key") if secrets is not None else None
    url = local_stack.console_url(children["orchestrator"].fields["http"], secure=secrets is not None, api_key=key)
    print(f"web console: {url}", flush=True)
    if secrets is not None:
        _say(f"  the part after '#' is the API key (the browser keeps it to itself). The page is HTTPS with the "
             f"development CA {secrets.ca_cert}: trust it in the browser, or run `tandem demo --web --insecure`.")
    _say("  the demo buttons cut, black-hole, slow and restore the link; Ctrl-C stops everything")
    if opener is not None or _has_display():
        try:
            # The browser is handed a private redirect file, so the key never shows in a process list.
            (opener or webbrowser.open)(_redirect_file(url, secrets.folder) if secrets is not None else url)
        except Exception as exc:  # noqa: BLE001 - opening a browser is a convenience; the URL is printed
            _say(f"  (could not open a browser: {exc})")
    try:
        while True:
            for name, child in children.items():
                if child.proc.poll() is not None:
                    raise CliError(f"the {name} process ended (exit code {child.proc.returncode}); its log: "
                                   f"{child.log_path}")
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _say("\nCtrl-C: stopping every process")


def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _redirect_file(url: str, folder: Path) -> str:
    """A file URL of a page (mode 0600, in the secrets folder) that sends the browser on to `url`."""
    path = Path(folder) / "console.html"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'<!doctype html><meta http-equiv="refresh" content="0;url={html.escape(url)}">\n')
    return path.resolve().as_uri()


def _stream_answer(address: str, args: argparse.Namespace, params: Any, client_options: dict[str, Any]) -> None:
    """The sample request, through the client SDK and the orchestrator."""
    from tandem_sdk import Client, TandemError

    print(f">>> {args.prompt}\n", flush=True)
    with Client(address, generate_timeout_s=1800, **client_options) as client:
        try:
            answer = client.generate(prompt=args.prompt, route=args.route, max_new_tokens=args.max_new_tokens,
                                     temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                     seed=params.seed, category="code")
            for delta in answer:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        except TandemError as exc:
            raise CliError(f"generation failed: {exc}") from None
    print("\n")
    s = answer.stats
    if s.finish_reason == "length":
        print(f"[the answer reached the budget of {args.max_new_tokens} tokens; --max-new-tokens raises it]\n")
    print(f"route {s.route}: {s.reason}")
    for w in s.switches:
        print(f"  switched {w.from_route} -> {w.to_route} after {w.at_token} tokens ({w.reason})")
    _print_stats(s.generated_tokens, s.tokens_per_s, s.ttft_ms, s.acceptance_rate, s.mean_accepted_len,
                 s.target_forwards, s.rounds, s.edge_cpu_s)
    print(f"tokens verified by the cloud {s.verified_tokens}  |  produced on the device {s.local_tokens}  |  "
          f"bytes up {s.bytes_up:,}  down {s.bytes_down:,}  |  resumes {s.resumes}")


def _print_stats(n: int, tok_s: float, ttft_ms: float, acceptance: float, tau: float, forwards: int, rounds: int,
                 edge_cpu_s: float) -> None:
    print(f"tokens {n}  |  {tok_s:.2f} tok/s  |  TTFT {ttft_ms:.0f} ms")
    print(f"acceptance {acceptance:.1%}  |  mean accepted length {tau:.2f}  |  target forwards/token "
          f"{forwards / max(n, 1):.3f}  |  rounds {rounds}  |  edge CPU s/token {edge_cpu_s / max(n, 1):.3f}")


def _run_in_process(args: argparse.Namespace, params: Any) -> int:
    from cloud_node.scorer import encode_prompt
    from tandem.models import registry as models
    from tandem.pair import LocalPair

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
