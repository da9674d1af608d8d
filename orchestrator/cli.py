"""`tandem serve orchestrator` (and `python -m orchestrator`): the on-device orchestrator process.

Prints `orchestrator grpc=HOST:PORT http=HOST:PORT` once both listeners are up, then serves until
SIGINT/SIGTERM. Settings come from flags, then `TANDEM_ORCH_*` environment variables, then
defaults; a bad value exits with code 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"TANDEM_ORCH_{name}", default)


def add_orchestrator_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("orchestrator", help="run the on-device orchestrator (gRPC + OpenAI-compatible HTTP)")
    p.add_argument("--edge", default=_env("EDGE", None), required=_env("EDGE", None) is None,
                   help="the edge node's HOST:PORT")
    p.add_argument("--cloud", default=_env("CLOUD", None),
                   help="the cloud address the edge uses (HOST:PORT), probed for link health")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env("PORT", 7070)), help="gRPC port; 0 picks a free one")
    p.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", 7080)),
                   help="OpenAI-compatible HTTP port; 0 picks a free one, -1 turns it off")
    p.add_argument("--round-deadline-ms", type=int, default=int(_env("ROUND_DEADLINE_MS", 1000)),
                   help="a verification round later than this continues on the device")
    p.add_argument("--open-deadline-ms", type=int, default=int(_env("OPEN_DEADLINE_MS", 30000)))
    p.add_argument("--health-interval-s", type=float, default=float(_env("HEALTH_INTERVAL_S", 1.0)))
    p.add_argument("--max-new-tokens", type=int, default=int(_env("MAX_NEW_TOKENS", 256)),
                   help="default answer length")
    p.add_argument("--store", type=Path, default=_env("STORE", None), help="personal store file")
    p.add_argument("--no-personal", action="store_true", help="no personal documents (no embedder)")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from orchestrator.config import OrchestratorConfig

    return OrchestratorConfig(
        edge_address=args.edge, cloud_address=args.cloud, host=args.host, grpc_port=args.port,
        http_port=None if args.http_port < 0 else args.http_port, round_deadline_ms=args.round_deadline_ms,
        open_deadline_ms=args.open_deadline_ms, health_interval_s=args.health_interval_s,
        default_max_new_tokens=args.max_new_tokens, store_path=args.store, personal=not args.no_personal)


def run(args: argparse.Namespace) -> int:
    from tandem.cli.main import CliError

    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(message)s")
    return asyncio.run(_serve(config))


async def _serve(config: Any) -> int:
    from orchestrator.app import Running

    running = await Running(config).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http = f" http={config.host}:{running.http_port}" if running.http_port is not None else ""
    print(f"orchestrator grpc={config.host}:{running.grpc_port}{http}", flush=True)
    try:
        await stop.wait()
    finally:
        await running.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from tandem.cli.main import CliError

    parser = argparse.ArgumentParser(prog="python -m orchestrator")
    add_orchestrator_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["orchestrator", *(argv if argv is not None else sys.argv[1:])])
    try:
        return run(args)
    except CliError as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)
        return 2
