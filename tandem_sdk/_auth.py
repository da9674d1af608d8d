"""How a client proves who it talks to and who it is: TLS and the API key.

Guarantees:
- `tls=True` checks the server's certificate against the system's root CAs; `ca_cert` (a path
  to a PEM file, `~` allowed; PEM text; or PEM bytes) checks it against that CA instead and implies TLS.
  `server_name` overrides the name checked in the certificate (`grpc.ssl_target_name_override`)
  and needs TLS.
- Over TLS the API key travels as gRPC call credentials (`authorization: Bearer KEY` on every
  call). Without TLS, which a server accepts from loopback clients only unless it runs with
  `--insecure`, the same metadata is added to every call: anyone who can read the link can read
  it then. So a key for an address that is not loopback (`localhost`, 127.0.0.0/8, ::1, a
  `unix:` socket) without TLS raises `ValueError` unless `insecure=True` says so by name.
- A bad argument raises `ValueError` naming the argument before any channel exists; no message
  and no `repr` holds the key.
- grpcio and the standard library only.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any

import grpc

_PEM = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class ChannelSecurity:
    """The channel credentials (None: plaintext), extra channel options and per-call metadata."""

    credentials: grpc.ChannelCredentials | None = None
    options: tuple[tuple[str, Any], ...] = ()
    metadata: tuple[tuple[str, str], ...] | None = field(default=None, repr=False)


def channel_security(*, api_key: str | None, tls: bool, ca_cert: str | os.PathLike[str] | bytes | None,
                     server_name: str | None, address: str = "localhost", insecure: bool = False
                     ) -> ChannelSecurity:
    """Check the client's security arguments and turn them into a `ChannelSecurity`."""
    for name, flag in (("tls", tls), ("insecure", insecure)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}: must be True or False (got {type(flag).__name__})")  # noqa: TRY004
    key = _check_key(api_key)
    root = _read_ca(ca_cert) if ca_cert is not None else None
    use_tls = tls or root is not None
    if server_name is not None:
        if not isinstance(server_name, str) or not server_name.strip() or not _encodable(server_name):
            raise ValueError(f"server_name: must be a host name (got {server_name!r})")
        if not use_tls:
            raise ValueError("server_name: only applies over TLS; pass tls=True or ca_cert")
    if not use_tls:
        if key and not insecure and not _is_loopback(address):
            raise ValueError(f"api_key: refusing to send it in clear text to {address}, which is not a loopback "
                             "address; pass ca_cert (or tls=True) for the server's TLS, or insecure=True")
        return ChannelSecurity(metadata=(("authorization", "Bearer " + key),) if key else None)
    credentials = grpc.ssl_channel_credentials(root_certificates=root)
    if key:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(key))
    options = (("grpc.ssl_target_name_override", server_name.strip()),) if server_name else ()
    return ChannelSecurity(credentials, options)


def _is_loopback(address: str) -> bool:
    """Whether a gRPC target ("host:port", "[v6]:port", "dns:///host:port", "unix:path") stays
    on this machine."""
    target = address.strip()
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _encodable(text: str) -> bool:
    """True when UTF-8 can encode `text` (it holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_key(api_key: str | None) -> str | None:
    if api_key is None:
        return None
    if not isinstance(api_key, str):
        raise ValueError(f"api_key: must be a string (got {type(api_key).__name__})")  # noqa: TRY004
    key = api_key.strip()
    if not key or not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise ValueError("api_key: must be a non-empty string of printable ASCII characters without spaces")
    return key


def _read_ca(ca_cert: str | os.PathLike[str] | bytes) -> bytes:
    """The PEM bytes of `ca_cert`: PEM bytes or text as given, else the file at that path."""
    if isinstance(ca_cert, bytes):
        data = ca_cert
    elif isinstance(ca_cert, str) and _PEM.decode() in ca_cert:
        data = ca_cert.encode("ascii", "replace")
    elif isinstance(ca_cert, (str, os.PathLike)):
        try:
            with open(os.path.expanduser(os.fspath(ca_cert)), "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ValueError(f"ca_cert: cannot read {os.fspath(ca_cert)!r}: {exc.strerror or exc}") from None
    else:
        raise ValueError(f"ca_cert: must be a path or PEM bytes (got {type(ca_cert).__name__})")
    if _PEM not in data:
        raise ValueError("ca_cert: not a PEM certificate (no '-----BEGIN CERTIFICATE-----' line)")
    return data
