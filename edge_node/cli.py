"""`tandem serve edge` / `python -m edge_node`: run the edge node's gRPC service.

Prints `edge grpc=HOST:PORT` once it serves, and stops cleanly on SIGINT or SIGTERM.
Settings come from flags, then TANDEM_EDGE_* environment variables, then defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"TANDEM_EDGE_{name}", default)


def add_edge_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("edge", help="run the edge node (drafter) gRPC service")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env("PORT", 0)), help="0 picks a free port")
    p.add_argument("--cloud", default=_env("CLOUD", None), help="cloud verifier HOST:PORT (speculative mode)")
    p.add_argument("--drafter", type=Path, default=_env("DRAFTER", None), help="ONNX drafter folder")
    p.add_argument("--draft-len", type=int, default=int(_env("DRAFT_LEN", 4)))
    p.add_argument("--round-deadline-ms", type=int, default=int(_env("ROUND_DEADLINE_MS", 5000)))
    p.add_argument("--open-deadline-ms", type=int, default=int(_env("OPEN_DEADLINE_MS", 60000)),
                   help="deadline for opening a cloud session, prefill included")
    p.add_argument("--max-concurrent", type=int, default=int(_env("MAX_CONCURRENT", 4)))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from edge_node.drafter import DrafterModel
    from edge_node.server import EdgeSettings, create_server
    from tandem.cli.main import CliError

    drafter_dir = args.drafter
    if drafter_dir is None:
        from tandem.models import registry as models

        drafter_dir = models.drafter_onnx_dir()
    try:
        settings = EdgeSettings(cloud_address=args.cloud, draft_len=args.draft_len,
                                round_deadline_ms=args.round_deadline_ms, open_deadline_ms=args.open_deadline_ms,
                                max_concurrent=args.max_concurrent, drafter_name=Path(drafter_dir).name)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not (Path(drafter_dir) / "genai_config.json").exists():
        raise CliError(f"no ONNX drafter at {drafter_dir}; run `tandem models fetch`")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s edge %(levelname)s %(message)s")
    server, port = create_server(DrafterModel(drafter_dir), settings, f"{args.host}:{args.port}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"edge grpc={args.host}:{port}", flush=True)
    stop.wait()
    server.stop(grace=2).wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from tandem.cli.main import CliError

    parser = argparse.ArgumentParser(prog="python -m edge_node")
    add_edge_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["edge", *(argv if argv is not None else sys.argv[1:])])
    try:
        return run(args)
    except CliError as exc:
        print(f"edge: error: {exc}", file=sys.stderr)
        return 2
