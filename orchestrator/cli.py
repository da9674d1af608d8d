"""`tandem serve orchestrator` (and `python -m orchestrator`): the on-device orchestrator process.

Prints `orchestrator grpc=HOST:PORT http=HOST:PORT` once both listeners are up, then serves until
SIGINT/SIGTERM. Then it drains (`Running.drain`): health turns NOT_SERVING, new generations are
refused (gRPC UNAVAILABLE, HTTP 503), and the answers in flight finish within `--drain-s`
seconds; then it exits 0. A second signal, or the end of the drain period, stops it at once.
Settings come from flags, then `TANDEM_ORCH_*` environment variables, then defaults
(`OrchestratorConfig`); a bad value exits with code 2 and a message naming it. So does an unsafe
security setting (`resolve_security`: a non-loopback `--host` without TLS and an API key and
without `--insecure`, a key file others may read, a missing or unreadable certificate), checked
before anything heavy is imported or bound; the message never holds a key.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from orchestrator.config import (
    ENV_PREFIX,
    OrchestratorConfig,
    Security,
    resolve_security,
)
from tandem.config import ConfigError, add_flags, load
from tandem.security import SecurityError

log = logging.getLogger(__name__)


def add_orchestrator_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("orchestrator", help="run the on-device orchestrator (gRPC + OpenAI-compatible HTTP)",
                       description=f"Each flag falls back to {ENV_PREFIX}<FIELD>, then to its default.")
    add_flags(p, OrchestratorConfig, env_prefix=ENV_PREFIX)  # --api-key VALUE and the like are refused there
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM, then drain; raises ConfigError for a bad setting."""
    config = load(OrchestratorConfig, args, env_prefix=ENV_PREFIX)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(message)s")
    try:
        security = resolve_security(config)
    except SecurityError as exc:
        raise ConfigError(str(exc)) from None
    return asyncio.run(_serve(config, security))


async def _serve(config: OrchestratorConfig, security: Security) -> int:
    from orchestrator.app import Running

    running = await Running(config, security=security).start()
    first, second = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the first signal drains, a second one hurries
        loop.add_signal_handler(sig, lambda: (second if first.is_set() else first).set())
    http = f" http={config.host}:{running.http_port}" if running.http_port is not None else ""
    print(f"orchestrator grpc={config.host}:{running.grpc_port}{http}", flush=True)
    try:
        await first.wait()
        log.info("draining: up to %.0f s for %d answer(s) in flight", config.drain_s, running.admission.in_flight)
        t0 = time.monotonic()
        drained = await running.drain(config.drain_s, hurry=second)
        log.info("drained in %.2f s (%s)", time.monotonic() - t0, "every answer finished" if drained
                 else f"{running.admission.in_flight} answer(s) cut")
    finally:
        await running.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator")
    add_orchestrator_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["orchestrator", *(argv if argv is not None else sys.argv[1:])])
    try:
        return run(args)
    except (ConfigError, SecurityError) as exc:
        print(f"orchestrator: error: {exc}", file=sys.stderr)
        return 2
