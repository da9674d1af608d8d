"""`tandem serve edge` / `python -m edge_node`: run the edge node's gRPC service.

Prints `edge grpc=HOST:PORT` once it serves (and ` metrics=HOST:PORT` with --metrics-port: Prometheus'
`/metrics`, see `edge_node.metrics`). On SIGTERM or SIGINT it drains: health turns
NOT_SERVING, new generations are refused with UNAVAILABLE, and the running ones finish within
`drain_s` seconds; then it exits 0. A second signal, or the end of the drain period, stops it at
once (running streams are cancelled; a thread still running 2 s later is logged with its stack
and does not hold the exit).
Settings come from flags, then TANDEM_EDGE_* environment variables, then defaults
(`edge_node.config.EdgeConfig`); a bad value exits with code 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_node.config import ENV_PREFIX, EdgeConfig
from tandem.config import ConfigError, add_flags, load

log = logging.getLogger(__name__)
_SEND_GRACE_S = 5.0
_EXIT_GRACE_S = 2.0  # after the server stopped: how long cut generations may take to wind down


def add_edge_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("edge", help="run the edge node (drafter) gRPC service",
                       description=f"Each flag falls back to {ENV_PREFIX}<FIELD>, then to its default.")
    add_flags(p, EdgeConfig, env_prefix=ENV_PREFIX)
    p.set_defaults(func=run)
    return p


def _default_drafter() -> Path:
    from tandem.models import registry

    return registry.drafter_onnx_dir()


class _Signals:
    """SIGTERM/SIGINT: the first sets `first` (drain), any later one `second` (stop at once)."""

    def __init__(self) -> None:
        self.first, self.second = threading.Event(), threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, *_: object) -> None:
        (self.second if self.first.is_set() else self.first).set()

    def wait_first(self) -> None:
        # Python runs handlers on the main thread only, and a signal that lands on one of gRPC's
        # threads does not wake a main thread blocked without a timeout: poll.
        while not self.first.wait(0.1):
            pass


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM, then drain; raises ConfigError for a bad setting."""
    from edge_node.drafter import DrafterModel
    from edge_node.servicer import create_node

    config = load(EdgeConfig, args, env_prefix=ENV_PREFIX)
    if config.drafter is None:
        config = load(EdgeConfig, args, env_prefix=ENV_PREFIX, drafter=_default_drafter())
    if not (Path(config.drafter) / "genai_config.json").exists():  # type: ignore[arg-type]
        raise ConfigError(f"drafter: no ONNX drafter at {config.drafter}; run `tandem models fetch`")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s edge %(levelname)s %(message)s")
    node = create_node(DrafterModel(config.drafter), config)  # type: ignore[arg-type]
    signals = _Signals()
    node.server.start()
    scrape = f" metrics={config.metrics_host}:{node.metrics.start().port}" if node.metrics is not None else ""
    print(f"edge grpc={config.host}:{node.port}{scrape}", flush=True)
    signals.wait_first()
    log.info("draining: up to %.0f s for %d running generation(s)", config.drain_s, node.core.running)
    t0 = time.monotonic()
    drained = node.drain(config.drain_s, hurry=signals.second)
    left = node.core.running
    # Drained: the streams only have their last messages to send; a grace lets them (and any
    # unary call) finish. Otherwise cancel at once.
    node.server.stop(grace=_SEND_GRACE_S if drained else 0).wait()
    log.info("stopped after draining %.2f s (%s)", time.monotonic() - t0,
             "every generation finished" if drained else f"{left} generation(s) cut")
    _exit_if_stuck(node)
    return 0


def _exit_if_stuck(node: Any) -> None:
    """Stop at once means at once: a cut generation gets `_EXIT_GRACE_S` to wind down (its
    server thread waits for it, and the interpreter waits for that thread at exit); if one still
    runs, log every thread's stack for the post-mortem and exit 0 now.

    Seen once in CI (2026-11-26, 1 run in 4): the node logged "stopped ... (1 generation(s) cut)"
    and the process then did not exit for 38 s; not reproduced in 6 runs since. The stacks this
    logs are what will tell the cause."""
    deadline = time.monotonic() + _EXIT_GRACE_S
    while time.monotonic() < deadline and node.core.running:
        time.sleep(0.05)
    if not node.core.running:
        return
    import faulthandler
    import os

    log.warning("exiting now with %d generation(s) still winding down; every thread's stack follows",
                node.core.running)
    for handler in logging.getLogger().handlers:
        handler.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(0)



def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_node")
    add_edge_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["edge", *(argv if argv is not None else sys.argv[1:])])
    try:
        return run(args)
    except ConfigError as exc:
        print(f"edge: error: {exc}", file=sys.stderr)
        return 2
