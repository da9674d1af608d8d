"""`tandem serve cloud` / `python -m cloud_node`: the cloud verifier on Ray Serve.

Guarantees:
- Settings come from the flag, else the TANDEM_CLOUD_<NAME> environment variable, else the
  default, and are validated once in `CloudConfig.__post_init__`; a bad value exits with code 2
  and a message naming the field (or the environment variable).
- Without --address it starts a local Ray instance (never attaching to another one by
  accident); with --address it joins that cluster. It deploys the app and, once the gRPC health
  check through Serve's proxy answers SERVING, prints exactly one line to stdout:
  `cloud grpc=HOST:PORT` (flushed).
- SIGINT or SIGTERM drains, then shuts down cleanly: the drain switch (`cloud_node.serve_drain`)
  makes every replica turn NOT_SERVING, refuse new sessions with UNAVAILABLE and end each stream
  after its round in flight, so edges resume elsewhere with their committed tokens; then the
  app (or, for a local instance, Serve and Ray) is stopped, Serve waiting up to its
  graceful-shutdown timeout (`serve_app.GRACEFUL_SHUTDOWN_TIMEOUT_S`) for the streams to end,
  and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cloud_node.config import ENV_PREFIX, CloudConfig
from tandem.config import ConfigError, add_flags, load

log = logging.getLogger(__name__)

def config_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> CloudConfig:
    """Flag > TANDEM_CLOUD_* > default (the fetched target for model_dir); raises ConfigError."""
    if getattr(args, "model_dir", None) is None and not environ.get(ENV_PREFIX + "MODEL_DIR"):
        from tandem.models import registry

        return load(CloudConfig, args, environ, env_prefix=ENV_PREFIX, model_dir=registry.target_dir())
    return load(CloudConfig, args, environ, env_prefix=ENV_PREFIX)


def add_cloud_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `cloud` subcommand (to `tandem serve` or `python -m cloud_node`)."""
    p = subparsers.add_parser("cloud", help="run the cloud verifier (target model) on Ray Serve over gRPC",
                              description=f"Each flag falls back to {ENV_PREFIX}<FIELD> (e.g. {ENV_PREFIX}PORT), "
                                          "then to its default.")
    add_flags(p, CloudConfig, env_prefix=ENV_PREFIX)
    p.set_defaults(func=run)
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; raises ConfigError for a bad setting."""
    config = config_from(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cloud %(levelname)s %(message)s", stream=sys.stderr)
    stop = threading.Event()

    def install_handlers() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    install_handlers()
    return serve_until(config, stop, after_init=install_handlers)


def serve_until(config: CloudConfig, stop: threading.Event, after_init: Callable[[], None] = lambda: None) -> int:
    """Start (or join) Ray, deploy, print the ready line, wait for `stop`, shut down.

    `after_init` runs right after ray.init (which replaces the SIGTERM handler with its own).
    """
    import ray
    from ray import serve

    from cloud_node import serve_app, serve_drain
    from cloud_node.cpus import available_cpus

    local = config.address is None
    port = config.port or _free_port()
    cpus = None if not local else max(available_cpus(), int(config.replicas * config.replica_cpus + 0.999))
    ray.init(address="local" if local else config.address, num_cpus=cpus, include_dashboard=False,
             configure_logging=False)
    after_init()
    try:
        log.info("ray %s at %s", "local instance" if local else "cluster", ray.get_runtime_context().gcs_address)
        switch = serve_drain.create_switch()  # before the replicas start: each one waits on it
        serve_app.start(config.model_dir, grpc_port=port, http_port=_free_port(), dtype=config.dtype,
                        limits=config.limits(), replicas=config.replicas, num_cpus=config.replica_cpus,
                        threads=config.threads)
        host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        serve_app.wait_healthy(f"127.0.0.1:{port}", timeout_s=120)
        print(f"cloud grpc={host}:{port}", flush=True)
        stop.wait()
        _drain(switch)
    finally:
        try:  # the app first: Serve lets its replicas finish their streams, then the proxies go
            serve.delete(serve_app.APP_NAME)
            if local:
                serve.shutdown()
        except Exception:  # Ray may already be going down with the same signal
            log.warning("Serve shutdown was not clean", exc_info=True)
        ray.shutdown()
    return 0


def _drain(switch: Any) -> None:
    """Tell every replica to drain: they refuse new sessions and end their streams after the round in flight."""
    from cloud_node import serve_drain

    log.info("draining: replicas refuse new sessions and end their streams after the round in flight")
    try:
        serve_drain.flip(switch)
    except Exception:  # Ray may already be going down with the same signal
        log.warning("could not drain the replicas; shutting down without", exc_info=True)
    log.info("shutting down")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_node")
    add_cloud_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cloud", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"cloud: error: {exc}", file=sys.stderr)
        return 2
