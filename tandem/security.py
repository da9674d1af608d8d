"""Transport security shared by every node: TLS credentials, bearer keys, secrets and the bind rule.

Guarantees:
- Secrets (tokens, API keys) come from a file or an environment variable, never from a command
  line (`ps` shows those). `read_secret` strips the surrounding whitespace, refuses an empty
  text or one holding anything but printable ASCII (a second line, a NUL, a byte order mark:
  gRPC and HTTP refuse such a header, and every call would fail later with a misleading error),
  and refuses a file every user may read or that anyone but its owner may write (mode & 0o026).
  A group may read it: a Kubernetes Secret mounted for a non-root container is 0440 with
  `fsGroup`. `file_exposure` is that mode check, for other files that must stay private.
- `write_secret` creates a randomly named temporary file in the destination's folder with
  O_EXCL and mode 0600 before any byte is written (no window where it is readable by others,
  and nothing another user planted under a guessable name is followed or reused), then
  replaces the destination atomically (a symlink there is replaced, never followed); a write
  that fails removes its temporary copy.
- `check_bind` is the one rule every server applies: a non-loopback address needs TLS and a
  credential, unless the operator passed `--insecure`; the error names what is missing.
- `RECONNECT_OPTIONS`: a client channel across the network (edge -> cloud, the orchestrator's
  link probes) tries to reconnect at least every 2 s, so a link that comes back is used within
  about 2 s, whatever the outage's length.
- `keepalive_options` (a client's) and `PING_SERVER_OPTIONS` (a server's) catch a frozen peer
  on a call that carries no data for a while: see `tandem.limits.KEEPALIVE_S`.
- No function here logs or puts a secret into an exception message.
- A leaf: the standard library and grpc; any runtime may use it.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import ssl
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tandem.config import ConfigError
from tandem.limits import MIN_PING_S

# gRPC's default server policy takes one ping every 5 minutes on a connection that sends no data,
# and ends the connection (GOAWAY "too_many_pings") after two more: a client with
# `keepalive_options` would lose its call during a long silent step. A server of ours takes them
# down to half of MIN_PING_S apart (timers jitter).
PING_SERVER_OPTIONS = [("grpc.http2.min_ping_interval_without_data_ms", int(MIN_PING_S * 500))]

AUTH_HEADER = "authorization"
BEARER = "Bearer "


class SecurityError(ConfigError):
    """A security setting is missing or unsafe; the message says which and never holds a secret.
    A ConfigError, so every CLI answers it with one line and exit code 2."""


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, brackets allowed) only listens on this machine."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(what: str, host: str, *, tls: bool, credential: bool, insecure: bool) -> None:
    """Refuse to listen beyond loopback without TLS and a credential, unless `insecure`."""
    if insecure or is_loopback(host):
        return
    missing = [name for name, present in (("TLS (a certificate and its key)", tls), ("a credential", credential))
               if not present]
    if missing:
        raise SecurityError(f"{what}: refusing to listen on {host}, a non-loopback address, without "
                            f"{' and '.join(missing)}; give them, bind 127.0.0.1, or pass --insecure to "
                            "expose it unprotected")


def file_exposure(st: os.stat_result, mask: int, *, check_owner: bool = False) -> str | None:
    """Why a file (its `os.stat`/`os.fstat` result) is open to other users, or None when it is not:
    a permission bit in `mask` is set, or (`check_owner`) its owner is neither this process's user
    nor root (root owns a mounted Kubernetes Secret, and can change any file anyway)."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & mask:
        may = "read or changed" if mask & 0o044 else "changed"
        return f"may be {may} by other users (mode {mode:o}); chmod 600 it"
    if check_owner and st.st_uid not in (0, os.geteuid()):
        return f"belongs to uid {st.st_uid}, neither this user (uid {os.geteuid()}) nor root; chown it"
    return None


def _refuse_unprintable(text: str, what: str, where: str) -> None:
    """SecurityError naming the first character of `text` outside printable ASCII, never the secret."""
    for i, ch in enumerate(text, start=1):
        if " " <= ch <= "~":
            continue
        kind = ("a line break" if ch in "\r\n" else "a NUL character" if ch == "\0" else
                "a byte order mark (U+FEFF)" if ch == "\ufeff" else
                f"a control character (U+{ord(ch):04X})" if ch.isascii() or not ch.isprintable() else
                f"a non-ASCII character (U+{ord(ch):04X})")
        raise SecurityError(f"{what}: {where} holds {kind} at character {i}; a secret must be one line of "
                            "printable ASCII (surrounding whitespace is ignored)")


def read_secret(*, file: Path | None, env: str | None = None, what: str,
                environ: Mapping[str, str] | None = None) -> str | None:
    """The secret from `file`, else from the environment variable `env`, else None."""
    environ = os.environ if environ is None else environ
    if file is not None:
        path = Path(file).expanduser()
        try:
            with open(path, "rb") as handle:
                problem = file_exposure(os.fstat(handle.fileno()), 0o026)
                if problem:
                    raise SecurityError(f"{what}: {path} {problem}")
                data = handle.read()
        except OSError as exc:
            raise SecurityError(f"{what}: cannot read {path}: {exc.strerror}") from None
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise SecurityError(f"{what}: {path} is not UTF-8 text (byte {exc.start + 1}); a secret must be "
                                "one line of printable ASCII") from None
        if not text:
            raise SecurityError(f"{what}: {path} is empty")
        _refuse_unprintable(text, what, str(path))
        return text
    if env and environ.get(env, "").strip():
        text = environ[env].strip()
        _refuse_unprintable(text, what, f"the environment variable {env}")
        return text
    return None


def write_secret(path: Path, text: str) -> Path:
    """Write `text` to `path` with mode 0600, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mkstemp: a random name opened with O_CREAT | O_EXCL (nothing planted there is followed or reused), mode 0600.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, 0o600)  # exactly: a strict umask never leaves the owner unable to read it
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves no copy of the secret behind
        raise
    return path


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison."""
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def bearer_from(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer TOKEN` entry in gRPC metadata (or a header mapping)."""
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    for key, value in items:
        if str(key).lower() == AUTH_HEADER:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            # RFC 7235: the scheme is case-insensitive ("bearer KEY" is "Bearer KEY").
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == BEARER.strip().lower() else None
    return None


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key (PEM files), and the CA of its clients for mutual TLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_flags(cls, what: str, cert: Path | None, key: Path | None, client_ca: Path | None = None) -> ServerTls | None:
        if cert is None and key is None:
            if client_ca is not None:
                raise SecurityError(f"{what}: a client CA (mutual TLS) needs the server's certificate and key")
            return None
        if cert is None or key is None:
            raise SecurityError(f"{what}: TLS needs both a certificate and its key")
        for path in (cert, key, client_ca):
            if path is not None and not Path(path).is_file():
                raise SecurityError(f"{what}: no file at {path}")
        return cls(Path(cert), Path(key), None if client_ca is None else Path(client_ca))

    def grpc_credentials(self) -> Any:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())], root_certificates=ca,
                                           require_client_auth=ca is not None)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            ctx.load_verify_locations(self.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass(frozen=True)
class ClientTls:
    """How a client checks its server (a CA file, or the system's roots when None) and, for mutual
    TLS, its own certificate and key; `server_name` overrides the name checked in the certificate."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def grpc_credentials(self) -> Any:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None)

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def client_tls(what: str, *, tls: bool, ca: Path | None, cert: Path | None = None, key: Path | None = None,
               server_name: str | None = None) -> ClientTls | None:
    """The client side of a hop: TLS when asked for or when any TLS file is given."""
    if (cert is None) != (key is None):
        raise SecurityError(f"{what}: a client certificate needs its key, and the key its certificate")
    for path in (ca, cert, key):
        if path is not None and not Path(path).is_file():
            raise SecurityError(f"{what}: no file at {path}")
    if not (tls or ca or cert):
        return None
    return ClientTls(ca, cert, key, server_name)


def secure_channel(address: str, tls: ClientTls | None, token: str | None, *, aio: bool = False,
                   options: list[tuple[str, Any]] | None = None) -> Any:
    """A gRPC channel to `address`: TLS when `tls`, the bearer `token` on every call when given.

    Over TLS the token travels as gRPC call credentials; without TLS (loopback only, since
    `check_bind` makes every other server use TLS) an interceptor adds the same metadata.
    """
    opts = list(options or []) + (tls.options() if tls else [])
    if tls is not None:
        creds = tls.grpc_credentials()
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        return (grpc.aio if aio else grpc).secure_channel(address, creds, options=opts)
    if not token:
        return (grpc.aio if aio else grpc).insecure_channel(address, options=opts)
    entry = ((AUTH_HEADER, BEARER + token),)
    if aio:
        return grpc.aio.insecure_channel(address, options=opts, interceptors=_aio_adders(entry))
    return grpc.intercept_channel(grpc.insecure_channel(address, options=opts), _MetadataAdder(entry))


# A channel across the network reconnects at least this often while its peer is unreachable, and
# gives one attempt this long: gRPC's defaults (backoff growing x1.6 up to 120 s, each attempt
# allowed 20 s) left a link that came back after a minute's outage unused for another minute.
RECONNECT_OPTIONS: list[tuple[str, int]] = [("grpc.initial_reconnect_backoff_ms", 250),
                                            ("grpc.min_reconnect_backoff_ms", 2000),
                                            ("grpc.max_reconnect_backoff_ms", 2000)]


def keepalive_options(every_s: float) -> list[tuple[str, int]]:
    """Client channel options: while a call is open, an HTTP/2 ping every `every_s` seconds, data
    or not (no cap on pings without data); one not answered within `every_s` fails the call with
    UNAVAILABLE. The server must take them (`PING_SERVER_OPTIONS`)."""
    ms = int(every_s * 1000)
    # ping_timeout_ms bounds any ping in flight (gRPC's own flow-control pings too, 60 s by
    # default): while one is out no keepalive ping is sent, so without it a peer that froze just
    # after answering data went unnoticed for a minute.
    return [("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", ms), ("grpc.http2.ping_timeout_ms", ms),
            ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 0)]


def _merged(details: Any, entry: tuple[tuple[str, str], ...]) -> Any:
    metadata = tuple(details.metadata or ()) + entry
    fields = {name: getattr(details, name, None) for name in
              ("method", "timeout", "credentials", "wait_for_ready", "compression")}
    return _CallDetails(metadata=metadata, **fields)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self, name, value)


class _MetadataAdder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, entry: tuple[tuple[str, str], ...]) -> None:
        self._entry = entry

    def intercept_unary_unary(self, cont: Any, details: Any, request: Any) -> Any:
        return cont(_merged(details, self._entry), request)

    def intercept_unary_stream(self, cont: Any, details: Any, request: Any) -> Any:
        return cont(_merged(details, self._entry), request)

    def intercept_stream_unary(self, cont: Any, details: Any, requests: Any) -> Any:
        return cont(_merged(details, self._entry), requests)

    def intercept_stream_stream(self, cont: Any, details: Any, requests: Any) -> Any:
        return cont(_merged(details, self._entry), requests)


def _aio_adders(entry: tuple[tuple[str, str], ...]) -> list[Any]:
    def add(details: Any) -> Any:
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), *entry)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)

    class UU(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, cont: Any, details: Any, request: Any) -> Any:
            return await cont(add(details), request)

    class US(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, cont: Any, details: Any, request: Any) -> Any:
            return await cont(add(details), request)

    class SU(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, cont: Any, details: Any, requests: Any) -> Any:
            return await cont(add(details), requests)

    class SS(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, cont: Any, details: Any, requests: Any) -> Any:
            return await cont(add(details), requests)

    return [UU(), US(), SU(), SS()]


HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _deny_handler(handler: Any, code: grpc.StatusCode, message: str, aio: bool) -> Any:
    """A handler of the same kind as `handler` that answers `code` before reading anything."""
    if aio:
        async def deny_aio(request: Any, context: Any) -> Any:
            await context.abort(code, message)

        fn: Any = deny_aio
    else:
        def deny_sync(request: Any, context: Any) -> Any:
            context.abort(code, message)

        fn = deny_sync
    kind = ("unary_unary" if not handler.request_streaming and not handler.response_streaming else
            "unary_stream" if not handler.request_streaming else
            "stream_unary" if not handler.response_streaming else "stream_stream")
    # No request deserializer: the refusal reads nothing, so a caller without the key learns
    # nothing about the method's message either (bad bytes get UNAUTHENTICATED too).
    return getattr(grpc, f"{kind}_rpc_method_handler")(fn, request_deserializer=None,
                                                        response_serializer=handler.response_serializer)


def _key_verdict(key: str, details: Any, exempt: tuple[str, ...]) -> str | None:
    """None when the call may go on, else the message of its UNAUTHENTICATED status."""
    if details.method.startswith(exempt):
        return None
    given = bearer_from(details.invocation_metadata)
    if given is None:
        return "missing credential: send the API key as 'authorization: Bearer KEY' metadata"
    return None if same_secret(given, key) else "invalid API key"


class KeyInterceptor(grpc.ServerInterceptor):
    """A sync server's API-key check: UNAUTHENTICATED without `authorization: Bearer KEY`
    (health checks are exempt, so probes and load balancers need no key)."""

    def __init__(self, key: str, exempt: tuple[str, ...] = (HEALTH_PREFIX,)) -> None:
        self._key, self._exempt = key, exempt

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        denial = _key_verdict(self._key, details, self._exempt)
        if denial is None or handler is None:
            return handler
        return _deny_handler(handler, grpc.StatusCode.UNAUTHENTICATED, denial, aio=False)


class AioKeyInterceptor(grpc.aio.ServerInterceptor):
    """`KeyInterceptor` for a grpc.aio server."""

    def __init__(self, key: str, exempt: tuple[str, ...] = (HEALTH_PREFIX,)) -> None:
        self._key, self._exempt = key, exempt

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        denial = _key_verdict(self._key, details, self._exempt)
        if denial is None or handler is None:
            return handler
        return _deny_handler(handler, grpc.StatusCode.UNAUTHENTICATED, denial, aio=True)


def add_port(server: Any, address: str, tls: ServerTls | None) -> int:
    """Bind `server` to `address`, over TLS when `tls` is given; returns the port."""
    if tls is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, tls.grpc_credentials()))
