"""The orchestrator's one frozen configuration.

Guarantees: every value is validated in `__post_init__` and a bad one raises `ValueError`
naming the field. Sources, in order of precedence: CLI flag, then `TANDEM_ORCH_*` environment
variable, then the default (`tandem.config.load`); the defaults shared with the
edge come from `tandem.limits`.

Security: no field holds a secret. The API keys come from a file (`--api-key-file`, mode 0600) or
from the variables `TANDEM_ORCH_API_KEY` / `TANDEM_ORCH_EDGE_API_KEY`, read once at start-up by
`resolve_security`, which also applies the bind rule (`tandem.security.check_bind`: a
non-loopback `--host` needs TLS and an API key, and a non-loopback `--edge` needs TLS, unless
`--insecure`) and loads every certificate,
so a bad setting fails before anything is bound or loaded. Its errors are `SecurityError`s that
name the setting and never hold a key.
"""

from __future__ import annotations

import functools
import logging
import math
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.limits import (
    DRAIN_S,
    KEEPALIVE_S,
    MAX_CONCURRENT_GENERATIONS,
    MAX_CONTEXT,
    MAX_DEADLINE_MS,
    MAX_DRAIN_S,
    MAX_NEW_TOKENS,
    MIN_PING_S,
    OPEN_DEADLINE_MS,
    ROUND_DEADLINE_MS,
)
from tandem.security import ClientTls, SecurityError, ServerTls, check_bind, client_tls, is_loopback, read_secret

log = logging.getLogger(__name__)

ENV_PREFIX = "TANDEM_ORCH_"
MAX_CONTEXT_CHUNKS = 16
API_KEY_ENV = ENV_PREFIX + "API_KEY"  # the API key itself (or --api-key-file)
EDGE_API_KEY_ENV = ENV_PREFIX + "EDGE_API_KEY"  # the edge node's key itself (or --edge-api-key-file)


def _f(default: Any, text: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": text, **extra})


@dataclass(frozen=True)
class OrchestratorConfig:
    edge_address: str = field(metadata={"flag": "--edge", "help": "the edge node's gRPC HOST:PORT (on this device)"})
    cloud_address: str | None = _f(None, "the cloud address the edge uses (HOST:PORT), probed for link health",
                                   flag="--cloud")
    host: str = _f("127.0.0.1", "address to listen on")
    grpc_port: int = _f(7070, "gRPC port; 0 picks a free one", flag="--port")
    http_port: int | None = _f(7080, "OpenAI-compatible HTTP port; 0 picks a free one, -1 turns it off")
    round_deadline_ms: int = _f(ROUND_DEADLINE_MS, "a verification round later than this continues on the device")
    open_deadline_ms: int = _f(OPEN_DEADLINE_MS, "opening a cloud session, prefill included")
    health_interval_s: float = _f(1.0, "cloud health probe period")
    probe_timeout_s: float = _f(1.0, "deadline of one health probe")
    circuit_open_s: float = _f(5.0, "first open period of the circuit breaker")
    default_max_new_tokens: int = _f(256, "answer length when a request sets none", flag="--max-new-tokens")
    context_chunks: int = _f(4, "personal chunks retrieved per request by default")
    max_prompt_chars: int = _f(200_000, "longest prompt accepted")
    cloud_max_context: int = _f(MAX_CONTEXT, "prompt + answer tokens the cloud keeps (its --max-context); the "
                                             "speculative and cloud routes are held to it, the local route to "
                                             "the edge's context")
    max_concurrent: int = _f(MAX_CONCURRENT_GENERATIONS, "generations at once; more get RESOURCE_EXHAUSTED "
                                                         "before anything is streamed")
    store_path: Path | None = _f(None, "personal store file (default TANDEM_HOME/personal/store.sqlite3)",
                                 flag="--store")
    personal: bool = _f(True, "load the embedder and the personal store")
    target_name: str = _f("qwen2.5-coder-1.5b-instruct", "the model name the OpenAI endpoint reports")
    edge_timeout_s: float = _f(3600.0, "a generation's hard limit when the request sets none")
    edge_keepalive_s: float = _f(KEEPALIVE_S, "while a call to the edge node is open, ping it this often; a node "
                                              "that does not answer a ping within as long (frozen, hung) fails "
                                              f"the call with UNAVAILABLE (at least {MIN_PING_S:g})")
    drain_s: float = _f(DRAIN_S, "on SIGTERM, how long the answers in flight may take to finish before the process stops")
    tls_cert: Path | None = _f(None, "PEM certificate (chain) of this orchestrator: serve gRPC and HTTP over TLS "
                                     "(needs --tls-key)")
    tls_key: Path | None = _f(None, "PEM private key of --tls-cert")
    api_key_file: Path | None = _f(None, "file (mode 0600) holding the API key every gRPC call and HTTP request "
                                         f"must send as 'Authorization: Bearer KEY'; or set {API_KEY_ENV} to the key",
                                   secret_env=API_KEY_ENV)
    insecure: bool = _f(False, "allow a non-loopback --host without TLS or an API key (INSECURE: anyone on the "
                               "network can use it), and a non-loopback --edge without TLS (prompts, answers and "
                               "the edge's API key cross the network in clear text)")
    edge_tls: bool = _f(False, "reach the edge node over TLS (the system's CAs unless --edge-ca-cert)")
    edge_ca_cert: Path | None = _f(None, "PEM CA certificate that signed the edge node's (implies --edge-tls)")
    edge_api_key_file: Path | None = _f(None, "file (mode 0600) holding the edge node's API key; or set "
                                              f"{EDGE_API_KEY_ENV} to the key", secret_env=EDGE_API_KEY_ENV)
    cloud_tls: bool = _f(False, "probe the cloud's health over TLS (the system's CAs unless --cloud-ca-cert)")
    cloud_ca_cert: Path | None = _f(None, "PEM CA certificate that signed the cloud's (implies --cloud-tls)")
    shaper_control: str | None = _f(None, "loopback HOST:PORT of the link shaper's control endpoint (`tandem up` and "
                                          "`tandem demo` set it): the web console's demo buttons cut, black-hole, "
                                          "slow and restore the link through it")

    def __post_init__(self) -> None:
        if self.http_port is not None and self.http_port < 0:
            object.__setattr__(self, "http_port", None)  # -1 on the command line: no HTTP endpoint
        if not self.edge_address or ":" not in self.edge_address:
            raise ValueError(f"edge_address must be HOST:PORT, got {self.edge_address!r}")
        if self.cloud_address is not None and ":" not in self.cloud_address:
            raise ValueError(f"cloud_address must be HOST:PORT, got {self.cloud_address!r}")
        for name in ("grpc_port",):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        for name in ("round_deadline_ms", "open_deadline_ms"):
            if not 1 <= getattr(self, name) <= MAX_DEADLINE_MS:
                raise ValueError(f"{name} must be in [1, {MAX_DEADLINE_MS}], got {getattr(self, name)}")
        for name in ("max_concurrent", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("health_interval_s", "probe_timeout_s", "circuit_open_s", "edge_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)}")
        if not MIN_PING_S <= self.edge_keepalive_s <= MAX_DEADLINE_MS / 1000:
            raise ValueError(f"edge_keepalive_s must be in [{MIN_PING_S:g}, {MAX_DEADLINE_MS // 1000}], "
                             f"got {self.edge_keepalive_s}")
        if not 1 <= self.default_max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"default_max_new_tokens must be in [1, {MAX_NEW_TOKENS}]")
        if not 2 <= self.cloud_max_context <= MAX_CONTEXT:
            raise ValueError(f"cloud_max_context must be in [2, {MAX_CONTEXT}], got {self.cloud_max_context}")
        if not 0 <= self.drain_s <= MAX_DRAIN_S:
            raise ValueError(f"drain_s must be in [0, {MAX_DRAIN_S:g}], got {self.drain_s}")
        if not 0 <= self.context_chunks <= MAX_CONTEXT_CHUNKS:
            raise ValueError(f"context_chunks must be in [0, {MAX_CONTEXT_CHUNKS}]")
        if self.shaper_control is not None:
            host, _, port = self.shaper_control.rpartition(":")
            if not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535 or not is_loopback(host.strip("[]")):
                raise ValueError(f"shaper_control must be a loopback HOST:PORT (the control endpoint has no "
                                 f"authentication), got {self.shaper_control!r}")
        self._check_security_files()

    def _check_security_files(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both (--tls-cert and --tls-key) or neither")
        for name in ("tls_cert", "tls_key", "api_key_file", "edge_ca_cert", "edge_api_key_file", "cloud_ca_cert"):
            path = getattr(self, name)
            if path is None:
                continue
            object.__setattr__(self, name, Path(path).expanduser())  # a ~ from an environment variable too
            if not getattr(self, name).is_file():
                raise ValueError(f"{name}: no file at {path}")


@dataclass(frozen=True)
class Security:
    """What `resolve_security` read: the listeners' TLS, the API key, and the client side of each hop.

    The keys are left out of `repr`, so a log line or a traceback showing this object holds none.
    """

    server_tls: ServerTls | None = None
    api_key: str | None = field(default=None, repr=False)
    edge_tls: ClientTls | None = None
    edge_key: str | None = field(default=None, repr=False)
    cloud_tls: ClientTls | None = None


def resolve_security(config: OrchestratorConfig, environ: Mapping[str, str] | None = None) -> Security:
    """Read the keys, load the certificates and apply the bind rule; raises `SecurityError`."""
    server_tls = ServerTls.from_flags("orchestrator", config.tls_cert, config.tls_key)
    if server_tls is not None:
        _load("tls_cert/tls_key", server_tls.ssl_context)
    api_key = read_secret(file=config.api_key_file, env=API_KEY_ENV, what="api key", environ=environ)
    try:
        check_bind("orchestrator", config.host, tls=server_tls is not None, credential=api_key is not None,
                   insecure=config.insecure)
    except SecurityError as exc:
        raise SecurityError(f"{exc} (TLS: --tls-cert and --tls-key; the credential: --api-key-file or "
                            f"{API_KEY_ENV})") from None
    if not is_loopback(config.host) and (server_tls is None or api_key is None):
        missing = " and ".join(w for w, ok in (("TLS", server_tls), ("an API key", api_key)) if ok is None)
        log.warning("INSECURE (--insecure): listening on %s without %s; it is unprotected: anyone on the network "
                    "can use it or read its traffic", config.host, missing)
    edge_tls = client_tls("edge", tls=config.edge_tls, ca=config.edge_ca_cert)
    if edge_tls is None and not is_loopback(config.edge_address.rsplit(":", 1)[0]):
        if not config.insecure:
            raise SecurityError(f"edge: {config.edge_address} is not a loopback address: reaching it without TLS "
                                "sends prompts, answers and its API key in clear text; give --edge-ca-cert (or "
                                "--edge-tls), or --insecure")
        log.warning("INSECURE (--insecure): the edge node at %s is reached without TLS: prompts and answers cross "
                    "the network in clear text", config.edge_address)
    cloud_tls = client_tls("cloud", tls=config.cloud_tls, ca=config.cloud_ca_cert)
    for name, tls in (("edge_ca_cert", edge_tls), ("cloud_ca_cert", cloud_tls)):
        if tls is not None and tls.ca is not None:
            _load(name, functools.partial(ssl.create_default_context, cafile=str(tls.ca)))
    edge_key = read_secret(file=config.edge_api_key_file, env=EDGE_API_KEY_ENV, what="edge api key", environ=environ)
    return Security(server_tls, api_key, edge_tls, edge_key, cloud_tls)


def _load(name: str, load: Callable[[], object]) -> None:
    """Run `load` (which parses PEM files); a bad file becomes a SecurityError naming `name`."""
    try:
        load()
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
        raise SecurityError(f"{name}: not a usable PEM file ({reason})") from None
