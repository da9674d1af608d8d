"""`tandem serve edge` / `python -m edge_node`: run the edge node's gRPC service.

Prints `edge grpc=HOST:PORT` once it serves, and stops cleanly on SIGINT or SIGTERM.
Settings come from flags, then TANDEM_EDGE_* environment variables, then defaults
(`edge_node.config.EdgeConfig`); a bad value exits with code 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_node.config import ENV_PREFIX, EdgeConfig
from tandem.config import ConfigError, add_flags, load


def add_edge_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("edge", help="run the edge node (drafter) gRPC service",
                       description=f"Each flag falls back to {ENV_PREFIX}<FIELD>, then to its default.")
    add_flags(p, EdgeConfig, env_prefix=ENV_PREFIX)
    p.set_defaults(func=run)
    return p


def _default_drafter() -> Path:
    from tandem.models import registry

    return registry.drafter_onnx_dir()


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; raises ConfigError for a bad setting."""
    from edge_node.drafter import DrafterModel
    from edge_node.servicer import create_server

    config = load(EdgeConfig, args, env_prefix=ENV_PREFIX)
    if config.drafter is None:
        config = load(EdgeConfig, args, env_prefix=ENV_PREFIX, drafter=_default_drafter())
    if not (Path(config.drafter) / "genai_config.json").exists():  # type: ignore[arg-type]
        raise ConfigError(f"drafter: no ONNX drafter at {config.drafter}; run `tandem models fetch`")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s edge %(levelname)s %(message)s")
    server, port = create_server(DrafterModel(config.drafter), config)  # type: ignore[arg-type]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"edge grpc={config.host}:{port}", flush=True)
    stop.wait()
    server.stop(grace=2).wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_node")
    add_edge_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["edge", *(argv if argv is not None else sys.argv[1:])])
    try:
        return run(args)
    except ConfigError as exc:
        print(f"edge: error: {exc}", file=sys.stderr)
        return 2
