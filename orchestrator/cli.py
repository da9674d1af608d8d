"""`tandem serve orchestrator` (and `python -m orchestrator`): the on-device orchestrator process.

Prints `orchestrator grpc=HOST:PORT http=HOST:PORT` once both listeners are up, then serves until
SIGINT/SIGTERM. Settings come from flags, then `TANDEM_ORCH_*` environment variables, then
defaults; a bad value exits with code 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from orchestrator.config import ENV_PREFIX, OrchestratorConfig
from tandem.config import ConfigError, add_flags, load


def add_orchestrator_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("orchestrator", help="run the on-device orchestrator (gRPC + OpenAI-compatible HTTP)",
                       description=f"Each flag falls back to {ENV_PREFIX}<FIELD>, then to its default.")
    add_flags(p, OrchestratorConfig, env_prefix=ENV_PREFIX)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; raises ConfigError for a bad setting."""
    config = load(OrchestratorConfig, args, env_prefix=ENV_PREFIX)
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
    parser = argparse.ArgumentParser(prog="python -m orchestrator")
    add_orchestrator_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["orchestrator", *(argv if argv is not None else sys.argv[1:])])
    try:
        return run(args)
    except ConfigError as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)
        return 2
