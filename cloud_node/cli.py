"""`tandem serve cloud` / `python -m cloud_node`: the cloud verifier on Ray Serve.

Guarantees:
- Settings come from the flag, else the TANDEM_CLOUD_<NAME> environment variable, else the
  default, and are validated once in `CloudConfig.__post_init__`; a bad value exits with code 2
  and a message naming the field (or the environment variable).
- Without --address it starts a local Ray instance (never attaching to another one by
  accident); with --address it joins that cluster. It deploys the app, starts the gateway
  (`cloud_node.gateway`: TLS, per-device tokens) in front of Serve's proxy and, once the gRPC
  health check through the gateway answers SERVING, prints exactly one line to stdout:
  `cloud grpc=HOST:PORT` (flushed): the gateway's address, the one edges use; with
  --metrics-port a local Ray instance adds ` metrics=127.0.0.1:PORT`, its Prometheus exporter
  (`cloud_node.metrics`).
- Security settings are checked before Ray starts: a non-loopback --host without TLS and a
  token store (and without --insecure), a missing certificate, a --tokens-file that does not
  exist or an unreadable store exits 2 with one line naming the problem. A store with no live
  token still starts, with one warning line that no device can connect yet. Secrets come from
  files, never from flags.
- `python -m cloud_node gateway --upstream HOST:PORT ...` runs the gateway alone (a KubeRay
  sidecar in front of the head's Serve proxy), with the same flags and rules.
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
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cloud_node.config import ENV_PREFIX, CloudConfig, GatewayConfig
from tandem.config import ConfigError, add_flags, load
from tandem.ports import free_ports
from tandem.security import SecurityError

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
    _add_gateway_flags(p, skip=("upstream",))
    p.set_defaults(func=run)
    return p


def _add_gateway_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    import dataclasses

    trimmed = dataclasses.make_dataclass("GatewayFlags", [(f.name, f.type, f) for f in dataclasses.fields(GatewayConfig)
                                                          if f.name not in skip])
    trimmed.__module__ = GatewayConfig.__module__
    add_flags(p, trimmed, env_prefix=ENV_PREFIX)


def add_gateway_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The `gateway` subcommand: the cloud's front door alone, forwarding to a Serve proxy."""
    p = subparsers.add_parser("gateway", help="run the cloud's gateway (TLS, tokens) in front of a Serve gRPC proxy",
                              description=f"Each flag falls back to {ENV_PREFIX}<FIELD>, then to its default.")
    _add_gateway_flags(p)
    p.set_defaults(func=run_gateway)
    return p


def gateway_config_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> GatewayConfig:
    return load(GatewayConfig, args, environ, env_prefix=ENV_PREFIX)


def run_gateway(args: argparse.Namespace) -> int:
    """Serve the gateway alone until SIGINT/SIGTERM."""
    import asyncio

    from cloud_node import gateway

    config = gateway_config_from(args)
    if config.upstream is None:
        raise ConfigError(f"upstream: required: give --upstream or set {ENV_PREFIX}UPSTREAM")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s", stream=sys.stderr)
    check_tokens_file(config)
    gw = gateway.build(config, config.upstream, gateway.gateway_secret(config))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        port = await gw.start(f"{config.host}:{config.port}")
        print(f"gateway grpc={config.host}:{port}", flush=True)
        await stop.wait()
        await gw.stop(5.0)

    asyncio.run(main())
    return 0


def check_tokens_file(front: GatewayConfig) -> None:
    """SecurityError for a --tokens-file that does not exist or is no store; a warning when it has no live token."""
    from cloud_node.tokens import TokenError, require_store

    if front.tokens_file is None:
        return
    try:
        records = require_store(front.tokens_file)
    except TokenError as exc:
        hint = "" if front.tokens_file.exists() else f"; make it with `tandem tokens --store {front.tokens_file} issue NAME`"
        raise SecurityError(f"tokens_file: {exc}{hint}") from None
    if not any(r.revoked is None for r in records):
        log.warning("the token store %s holds no live token: no device can connect until "
                    "`tandem tokens --store %s issue NAME`", front.tokens_file, front.tokens_file)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; raises ConfigError or SecurityError for a bad setting."""
    from cloud_node import gateway

    config = config_from(args)
    front = gateway_config_from(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cloud %(levelname)s %(message)s", stream=sys.stderr)
    check_tokens_file(front)
    front_door = gateway.build(front, None, gateway.gateway_secret(front))  # every security check, before Ray
    stop = threading.Event()

    def install_handlers() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    install_handlers()
    return serve_until(config, stop, after_init=install_handlers, front=front, front_door=front_door)


def serve_until(config: CloudConfig, stop: threading.Event, after_init: Callable[[], None] = lambda: None,
                front: GatewayConfig | None = None, front_door: Any = None) -> int:
    """Start (or join) Ray, deploy, start the gateway, print the ready line, wait for `stop`, shut down.

    `after_init` runs right after ray.init (which replaces the SIGTERM handler with its own).
    """
    import ray
    from ray import serve

    from cloud_node import gateway, serve_app, serve_drain
    from cloud_node.cpus import available_cpus

    front = front or GatewayConfig()
    front_door = front_door or gateway.build(front, None, gateway.gateway_secret(front))
    local = config.address is None
    # Serve's gRPC and HTTP proxies and the metrics exporter: distinct ports, chosen together
    # (one at a time, the kernel can give the same free port twice).
    chosen = iter(free_ports(3))
    port = config.serve_port or next(chosen)
    http_port = next(p for p in chosen if p != port)
    cpus = None if not local else max(available_cpus(), int(config.replicas * config.replica_cpus + 0.999))
    exporter = None if config.metrics_port is None or not local else (config.metrics_port or next(chosen))
    ray.init(address="local" if local else config.address, num_cpus=cpus, include_dashboard=False,
             configure_logging=False, _metrics_export_port=exporter)
    after_init()
    running = None
    try:
        log.info("ray %s at %s", "local instance" if local else "cluster", ray.get_runtime_context().gcs_address)
        switch = serve_drain.create_switch()  # before the replicas start: each one waits on it
        serve_app.start(config.model_dir, grpc_port=port, http_port=http_port, dtype=config.dtype,
                        limits=config.limits(), replicas=config.replicas, num_cpus=config.replica_cpus,
                        threads=config.threads, gateway_digest=front_door.secret_digest)
        serve_app.wait_healthy(f"127.0.0.1:{port}", timeout_s=120)
        front_door.upstream = f"127.0.0.1:{port}"
        running = gateway.InThread(front_door, f"{front.host}:{front.port}")
        log.info("Serve's proxy (internal) on port %d; edges connect to the gateway on %s:%d", port, front.host,
                 running.port)
        scrape = f" metrics=127.0.0.1:{exporter}" if exporter is not None else ""
        print(f"cloud grpc={_advertised(front.host)}:{running.port}{scrape}", flush=True)
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
        if running is not None:
            running.stop()
    return 0


def _advertised(host: str) -> str:
    """The host edges should use for a bind address (a wildcard names this machine's address)."""
    if host in ("0.0.0.0", "::", "[::]", ""):
        import ray

        return str(ray.util.get_node_ip_address())
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


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
    sub = parser.add_subparsers(dest="command", required=True)
    add_cloud_parser(sub)
    add_gateway_parser(sub)
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parser.parse_args(argv if argv[:1] == ["gateway"] else ["cloud", *argv])
    try:
        return int(args.func(args) or 0)
    except (ConfigError, SecurityError) as exc:
        print(f"cloud: error: {exc}", file=sys.stderr)
        return 2
