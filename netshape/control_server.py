"""The shaper's control endpoint, served by `aiohttp.web` on the shaper's event loop.

The protocol and its client are in `netshape.control`. Guarantees:
- It binds loopback addresses only, and it answers only requests whose Host header names a
  loopback address (a web page cannot reach it through DNS rebinding).
- Every reply the endpoint writes is JSON. A request it cannot serve gets a 4xx reply
  {"error": "..."} that says what is wrong, naming the field where there is one:
  400 body not JSON, not an object, an unknown field or an invalid value; 403 Host not loopback;
  404 no such path; 405 wrong method (with an Allow header); 413 body over 64 KiB;
  415 a POST whose Content-Type is not application/json (so a browser cannot post to it with a
  plain form). A bug in a handler gives 500 {"error": ...} and is logged. Bytes that are not
  HTTP at all get aiohttp's own plain-text 400.
- Handlers only translate: JSON to a call of the shaper's public methods, and back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from netshape.control import MAX_BODY, is_loopback
from netshape.shaper import Address, LinkConditions, LinkShaper

log = logging.getLogger(__name__)

_SHAPER = web.AppKey("shaper", LinkShaper)
_FIELDS = tuple(f.name for f in dataclasses.fields(LinkConditions))
_SHUTDOWN_TIMEOUT_S = 1.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlServer:
    """A running control endpoint; `address` is the bound one (port 0 resolved)."""

    def __init__(self, runner: web.AppRunner) -> None:
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.address: Address = (host, port)

    async def aclose(self) -> None:
        await self._runner.cleanup()


async def start_control_server(shaper: LinkShaper, host: str, port: int) -> ControlServer:
    """Serve the control endpoint of `shaper` on loopback `host:port` (0: any free port)."""
    if not is_loopback(host):
        raise ValueError(f"control: must be a loopback address, got {host!r}")
    runner = web.AppRunner(make_app(shaper), shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return ControlServer(runner)


def make_app(shaper: LinkShaper) -> web.Application:
    app = web.Application(middlewares=[_json_errors], client_max_size=MAX_BODY)
    app[_SHAPER] = shaper
    app.router.add_get("/conditions", _get_conditions, allow_head=False)
    app.router.add_post("/conditions", _post_conditions)
    app.router.add_post("/drop", _post_drop)
    app.router.add_get("/stats", _get_stats, allow_head=False)
    return app


class _RequestError(Exception):
    """A request the endpoint refuses; `status` is its 4xx code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- handlers ---------------------------------------------------------------------------------


async def _get_conditions(request: web.Request) -> web.Response:
    return web.json_response(dataclasses.asdict(request.app[_SHAPER].conditions))


async def _post_conditions(request: web.Request) -> web.Response:
    fields = await _json_object(request)
    for name in fields:
        if name not in _FIELDS:
            raise _RequestError(400, f"{name}: not a LinkConditions field ({', '.join(_FIELDS)})")
    try:
        conditions = request.app[_SHAPER].set_conditions(**fields)
    except ValueError as exc:  # LinkConditions names the field
        raise _RequestError(400, str(exc)) from None
    return web.json_response(dataclasses.asdict(conditions))


async def _post_drop(request: web.Request) -> web.Response:
    if fields := await _json_object(request):
        raise _RequestError(400, f"{next(iter(fields))}: /drop takes no fields")
    return web.json_response({"dropped": request.app[_SHAPER].drop_connections()})


async def _get_stats(request: web.Request) -> web.Response:
    return web.json_response(dataclasses.asdict(request.app[_SHAPER].stats()))


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The POST body as a JSON object; an empty body is {}."""
    if request.content_type != "application/json":
        raise _RequestError(415, f"POST bodies are JSON: send Content-Type: application/json, "
                                 f"not {request.content_type!r}")
    body = await request.read()  # raises 413 past client_max_size
    try:
        value = json.loads(body) if body.strip() else {}
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        raise _RequestError(400, f"body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _RequestError(400, "body must be a JSON object of fields to change")
    return value


# --- errors -----------------------------------------------------------------------------------


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every refusal and failure to a JSON reply {"error": ...}."""
    try:
        if not is_loopback(_host_name(request.host)):
            raise _RequestError(403, f"Host must be a loopback address, got {request.host!r}")
        return await handler(request)
    except _RequestError as exc:
        return _error(exc.status, str(exc))
    except web.HTTPException as exc:  # the router's 404 and 405, the body limit's 413
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _error(exc.status, _describe(request, exc), headers)
    except Exception:
        log.exception("control: %s %s failed", request.method, request.path)
        return _error(500, "internal error in the control endpoint (see the shaper's log)")


def _host_name(host: str) -> str:
    """The name in a Host header: 'NAME', 'NAME:PORT', '[V6]' or '[V6]:PORT'."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rpartition(":")[0] if ":" in host else host


def _describe(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPNotFound):
        return f"no such endpoint {request.path!r} (there are /conditions, /drop and /stats)"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = " or ".join(sorted(exc.allowed_methods))
        return f"{request.path} takes {allowed}, not {request.method}"
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return f"body too large (at most {MAX_BODY} bytes)"
    return exc.reason


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
