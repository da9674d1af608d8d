"""Run-time control of a `LinkShaper` from another process: a tiny HTTP/1.1 JSON endpoint.

Endpoints (one request per connection, JSON in and out):
- `GET /conditions` -> the conditions in force, e.g. {"rtt_ms": 20, "jitter_ms": 5, ...}
- `POST /conditions` with a JSON object of the fields to change -> the new conditions;
  400 {"error": ...} naming the field when a value or field name is invalid
- `POST /drop` -> {"dropped": n}, after resetting every live connection
- `GET /stats` -> bytes forwarded each direction and connection counts (see `LinkStats`)

The endpoint has no authentication, so it binds loopback only, and `ShaperControl` talks to
loopback only, bypassing any HTTP proxy from the environment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import json
import logging
import urllib.error
import urllib.request
from typing import Any

from netshape.shaper import Address, LinkConditions, LinkShaper, LinkStats, parse_address

log = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024
_REQUEST_TIMEOUT_S = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large"}


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def start_control_server(shaper: LinkShaper, host: str, port: int) -> asyncio.Server:
    if not is_loopback(host):
        raise ValueError(f"control: must be a loopback address, got {host!r}")
    return await asyncio.start_server(functools.partial(_serve_one, shaper), host, port)


async def _serve_one(shaper: LinkShaper, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    try:
        method, path, body = await asyncio.wait_for(_read_request(reader), _REQUEST_TIMEOUT_S)
        status, payload = 200, _route(shaper, method, path, body)
    except _HttpError as exc:
        status, payload = exc.status, {"error": str(exc)}
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        return
    data = json.dumps(payload).encode()
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    try:
        writer.write(head.encode("latin-1") + data)
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    parts = (await reader.readline()).decode("latin-1").split()
    if len(parts) != 3:
        raise _HttpError(400, "malformed request line")
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            if not value.strip().isdigit():
                raise _HttpError(400, "bad Content-Length")
            length = int(value)
    if length > _MAX_BODY:
        raise _HttpError(413, "body too large")
    return parts[0], parts[1].split("?", 1)[0], await reader.readexactly(length)


def _route(shaper: LinkShaper, method: str, path: str, body: bytes) -> dict[str, Any]:
    allowed = {"/conditions": ("GET", "POST"), "/drop": ("POST",), "/stats": ("GET",)}
    if path not in allowed:
        raise _HttpError(404, f"no such endpoint {path!r}")
    if method not in allowed[path]:
        raise _HttpError(405, f"{path} takes {' or '.join(allowed[path])}")
    if path == "/stats":
        return dataclasses.asdict(shaper.stats())
    if path == "/drop":
        return {"dropped": shaper.drop_connections()}
    if method == "POST":
        try:
            fields = json.loads(body or b"{}")
        except ValueError as exc:
            raise _HttpError(400, f"body is not JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise _HttpError(400, "body must be a JSON object of fields to change")
        try:
            shaper.set_conditions(**fields)
        except ValueError as exc:
            raise _HttpError(400, str(exc)) from None
    return dataclasses.asdict(shaper.conditions)


class ShaperControl:
    """Client for the control endpoint of a shaper, in this or another process."""

    def __init__(self, address: Address | str, timeout_s: float = 5.0) -> None:
        host, port = parse_address(address) if isinstance(address, str) else address
        if not is_loopback(host):
            raise ValueError(f"address: the control endpoint is loopback only, got {host!r}")
        self._base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def conditions(self) -> LinkConditions:
        return LinkConditions(**self._call("GET", "/conditions"))

    def set(self, **fields: Any) -> LinkConditions:
        """Change the given fields; raises ValueError naming the field when one is invalid."""
        return LinkConditions(**self._call("POST", "/conditions", fields))

    def drop(self) -> int:
        return int(self._call("POST", "/drop", {})["dropped"])

    def stats(self) -> LinkStats:
        return LinkStats(**self._call("GET", "/stats"))

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self._base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=self._timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code}"
            if exc.code == 400:
                raise ValueError(message) from None
            raise RuntimeError(f"{method} {path}: {message}") from None
