"""Run-time control of a `LinkShaper` from another process: a small HTTP/1.1 JSON endpoint.

Endpoints (JSON in and out; a POST body is sent as Content-Type: application/json):
- `GET /conditions` -> the conditions in force, e.g. {"rtt_ms": 20, "jitter_ms": 5, ...}
- `POST /conditions` with a JSON object of the fields to change -> the new conditions;
  400 {"error": ...} naming the field when a value or field name is invalid
- `POST /drop` (body empty or {}) -> {"dropped": n}, after resetting every live connection
- `GET /stats` -> bytes forwarded each direction and connection counts (see `LinkStats`)
Every other request gets a 4xx {"error": ...}; `netshape.control_server` lists them.

The endpoint has no authentication, so it binds loopback only, and `ShaperControl` talks to
loopback only, bypassing any HTTP proxy from the environment. The server is in
`netshape.control_server` (it needs aiohttp); this module, the client, needs only the standard
library.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.request
from typing import Any

from netshape.shaper import Address, LinkConditions, LinkStats, parse_address

MAX_BODY = 64 * 1024  # bytes; the endpoint refuses larger request bodies with 413


def is_loopback(host: str) -> bool:
    """True for "localhost" and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ShaperControl:
    """Client for the control endpoint of a shaper, in this or another process.

    A refused change raises ValueError with the endpoint's message (which names the field);
    any other error reply raises RuntimeError.
    """

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
        """Reset every live connection through the shaper; returns how many."""
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
