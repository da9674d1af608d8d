"""The web console on the orchestrator's HTTP port: its static files and the JSON routes it uses
beside the OpenAI endpoint (personal documents, status, the demo's link control).

Routes (`http_api.create_http_app(..., console=ConsoleBackend(...))` adds the JSON ones):
- `GET /` the console's page; `GET /console/app.js`, `/console/style.css` its script and style.
- `GET /v1/tandem/status`: link state, circuit, RTT and jitter, edge health, recent acceptance,
  document count, whether link control is on and the shaper's conditions.
- `GET /v1/tandem/documents?page_token=&page_size=`: one page `{documents, next_page_token}`.
- `POST /v1/tandem/documents` `{title, text, kind?, privacy?, source?, idempotency_key?}`: the
  stored document (201).
- `PATCH /v1/tandem/documents/{id}` `{privacy}`: the relabelled document.
- `DELETE /v1/tandem/documents/{id}`: `{deleted}`.
- `GET /v1/tandem/link`: `{conditions}`; `POST /v1/tandem/link` `{action, rtt_ms?}` with action
  "cut" (mode down: live connections reset, new ones refused), "blackhole" (bytes held, never
  delivered), "slow" (mode up, `rtt_ms` added, 300 by default) or "restore" (the conditions found
  before the first action): `{conditions}`.

Guarantees:
- The static files carry no data and load without the API key (`is_static`); every JSON route is
  behind it like every other route (`http_api`). The page is served with a Content-Security-Policy
  that allows only its own script, style and requests (no inline script), so a model's or a
  user's text cannot run as script even if it reached the DOM as markup (it does not: app.js
  writes text with `textContent` only).
- Documents go through `Personal`, the functions the gRPC service calls, with the same checks
  (`check_add`, `check_id`, the store's own) and errors; a JSON body is one object with known
  fields of the right types, else 400 naming the field (http_api's middleware gives OpenAI's
  error shape). A string with a lone surrogate (JSON's "\\ud800") is refused so (`check_text`),
  and so is a page_size that is not ASCII digits. Document JSON has the SDK's fields: id, title,
  kind, privacy ("private" or "shareable"), chunks, bytes, created_unix_ms, source, truncated.
- Link control talks only to the loopback address in `OrchestratorConfig.shaper_control` (checked
  there), never through a proxy from the environment; without it the link routes answer 400
  (code "disabled"), and a shaper that does not answer gives 503.
"""

from __future__ import annotations

import importlib.resources
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from orchestrator.core import Orchestrator
from orchestrator.errors import BadRequest, Disabled, Unavailable
from orchestrator.openai_replies import JsonObj, decode_body
from orchestrator.personal import PRIVACY_FROM_PROTO, Personal
from orchestrator.validation import check_id, check_text
from protos.tandem.v1 import orchestrator_pb2 as opb

ReadBody = Callable[[web.Request], Awaitable[bytes]]

STATIC = {"app.js": "text/javascript", "style.css": "text/css"}  # under /console/
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SLOW_RTT_MS = 300.0  # "slow" without rtt_ms
MAX_RTT_MS = 60_000.0
ACTIONS = ("cut", "blackhole", "slow", "restore")
_PRIVACY = {"private": opb.PRIVACY_PRIVATE, "shareable": opb.PRIVACY_SHAREABLE}
_ADD_FIELDS = {"title": str, "text": str, "kind": str, "privacy": str, "source": str, "idempotency_key": str}


def is_static(request: web.Request) -> bool:
    """A request for one of the console's static files (served without the API key)."""
    if request.method not in ("GET", "HEAD"):
        return False
    path = request.path
    return path == "/" or (path.startswith("/console/") and path.removeprefix("/console/") in STATIC)


class LinkControl:
    """The link shaper's control endpoint (`netshape.control`'s protocol, spoken over aiohttp)."""

    def __init__(self, address: str, timeout_s: float = 5.0) -> None:
        host, _, port = address.rpartition(":")
        self._base = f"http://{host}:{port}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._baseline: JsonObj | None = None  # the conditions before the first action

    async def conditions(self) -> JsonObj:
        return await self._call("GET", "/conditions")

    async def act(self, action: str, rtt_ms: float | None = None) -> JsonObj:
        if self._baseline is None:
            self._baseline = await self.conditions()
        if action == "cut":
            fields: JsonObj = {"mode": "down"}
        elif action == "blackhole":
            fields = {"mode": "blackhole"}
        elif action == "slow":
            fields = {"mode": "up", "rtt_ms": SLOW_RTT_MS if rtt_ms is None else rtt_ms}
        else:
            fields = {**self._baseline, "mode": "up"}
        return await self._call("POST", "/conditions", fields)

    async def _call(self, method: str, path: str, payload: JsonObj | None = None) -> JsonObj:
        try:
            async with aiohttp.ClientSession(timeout=self._timeout, trust_env=False) as session, \
                    session.request(method, self._base + path, json=payload) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            raise Unavailable("the link shaper's control endpoint does not answer") from None
        if resp.status != 200 or not isinstance(body, dict):
            raise Unavailable(f"the link shaper refused the change (HTTP {resp.status})")
        return body


class ConsoleBackend:
    """What the console's JSON routes read and change: the core's personal store and link state,
    and the shaper's control endpoint when the stack has one."""

    def __init__(self, core: Orchestrator, shaper_control: str | None = None) -> None:
        self.core = core
        self.link = LinkControl(shaper_control) if shaper_control else None

    def personal(self) -> Personal:
        if self.core.personal is None:
            raise Disabled("personal documents are disabled on this orchestrator (--no-personal)")
        return self.core.personal

    def link_control(self) -> LinkControl:
        if self.link is None:
            raise Disabled("link control is off: the orchestrator was started without --shaper-control "
                           "(`tandem up` and `tandem demo` set it)")
        return self.link

    async def status(self) -> JsonObj:
        core = self.core
        link = core.monitor.snapshot()
        edge = await core.edge_status()
        personal = core.personal
        conditions = None
        if self.link is not None:
            try:
                conditions = await self.link.conditions()
            except Unavailable:
                conditions = None
        return {
            "link": {"state": link.state, "circuit": link.circuit, "rtt_ms": _ms(link.rtt_ms),
                     "jitter_ms": _ms(link.jitter_ms), "consecutive_failures": link.consecutive_failures},
            "edge_healthy": edge is not None,
            "recent_acceptance": core.acceptance.overall(),
            "personal": personal is not None,
            "documents": await personal.count() if personal is not None else None,
            "link_control": self.link is not None,
            "conditions": conditions,
        }


def _ms(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 3)


def document_json(doc: opb.Document) -> JsonObj:
    return {"id": doc.id, "title": doc.title, "kind": doc.kind, "privacy": PRIVACY_FROM_PROTO[doc.privacy],
            "chunks": doc.chunks, "bytes": doc.bytes, "created_unix_ms": doc.created_unix_ms, "source": doc.source,
            "truncated": doc.truncated}


# --- routes ---

BACKEND_KEY = web.AppKey("tandem_console", ConsoleBackend)
READ_BODY_KEY = web.AppKey("tandem_console_read_body", Callable[[web.Request], Awaitable[bytes]])


def add_static_routes(app: web.Application) -> None:
    app.router.add_get("/", _index)
    app.router.add_get("/console/{name}", _static)


def add_api_routes(app: web.Application, backend: ConsoleBackend, read_body: ReadBody) -> None:
    """The JSON routes over `backend`; `read_body` reads a request body within the app's limits."""
    app[BACKEND_KEY] = backend
    app[READ_BODY_KEY] = read_body
    app.router.add_get("/v1/tandem/status", _status)
    app.router.add_get("/v1/tandem/documents", _list_documents)
    app.router.add_post("/v1/tandem/documents", _add_document)
    app.router.add_patch("/v1/tandem/documents/{doc_id}", _set_privacy)
    app.router.add_delete("/v1/tandem/documents/{doc_id}", _delete_document)
    app.router.add_get("/v1/tandem/link", _get_link)
    app.router.add_post("/v1/tandem/link", _post_link)


def _file(name: str) -> bytes:
    return (importlib.resources.files("orchestrator") / "console" / name).read_bytes()


_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}


async def _index(request: web.Request) -> web.Response:
    return web.Response(body=_file("index.html"), content_type="text/html", charset="utf-8", headers=_HEADERS)


async def _static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.Response(body=_file(name), content_type=STATIC[name], charset="utf-8", headers=_HEADERS)


async def _json_body(request: web.Request, fields: dict[str, type]) -> JsonObj:
    body = decode_body(await request.app[READ_BODY_KEY](request))
    for name, value in body.items():
        if name not in fields:
            raise BadRequest(name, f"unknown field (expected {', '.join(fields)})")
        kind = fields[name]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            raise BadRequest(name, f"must be a {'number' if kind is float else 'string'}")
        if isinstance(value, str):
            check_text(name, value)
    return body


def _privacy(value: str) -> int:
    if value not in _PRIVACY:
        raise BadRequest("privacy", f"must be \"private\" or \"shareable\", got {json.dumps(value)[:40]}")
    return _PRIVACY[value]


async def _status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[BACKEND_KEY].status())


async def _list_documents(request: web.Request) -> web.Response:
    size_text = request.query.get("page_size", "0")
    # isdigit() alone accepts "²" and other digits int() refuses or reads unexpectedly.
    if not (size_text.isascii() and size_text.isdigit()) or len(size_text) > 9:
        raise BadRequest("page_size", "must be a whole number")
    page = await request.app[BACKEND_KEY].personal().list_page(
        opb.ListDocumentsRequest(page_token=request.query.get("page_token", ""), page_size=int(size_text)))
    return web.json_response({"documents": [document_json(d) for d in page.documents],
                              "next_page_token": page.next_page_token})


async def _add_document(request: web.Request) -> web.Response:
    body = await _json_body(request, _ADD_FIELDS)
    add = opb.AddDocumentRequest(title=body.get("title", ""), text=body.get("text", ""), kind=body.get("kind", ""),
                                 privacy=_privacy(body.get("privacy", "private")), source=body.get("source", ""),
                                 idempotency_key=body.get("idempotency_key", ""))
    doc = await request.app[BACKEND_KEY].personal().add(add)
    return web.json_response(document_json(doc), status=201)


async def _set_privacy(request: web.Request) -> web.Response:
    doc_id = check_id("id", request.match_info["doc_id"])
    body = await _json_body(request, {"privacy": str})
    if "privacy" not in body:
        raise BadRequest("privacy", "is required (\"private\" or \"shareable\")")
    doc = await request.app[BACKEND_KEY].personal().set_privacy(doc_id, _privacy(body["privacy"]))
    return web.json_response(document_json(doc))


async def _delete_document(request: web.Request) -> web.Response:
    doc_id = check_id("id", request.match_info["doc_id"])
    return web.json_response({"deleted": await request.app[BACKEND_KEY].personal().delete(doc_id)})


async def _get_link(request: web.Request) -> web.Response:
    return web.json_response({"conditions": await request.app[BACKEND_KEY].link_control().conditions()})


async def _post_link(request: web.Request) -> web.Response:
    control = request.app[BACKEND_KEY].link_control()
    body = await _json_body(request, {"action": str, "rtt_ms": float})
    action = body.get("action")
    if action not in ACTIONS:
        raise BadRequest("action", f"must be one of {', '.join(ACTIONS)}")
    rtt_ms: Any = body.get("rtt_ms")
    if rtt_ms is not None and (action != "slow" or not 0 <= rtt_ms <= MAX_RTT_MS):
        raise BadRequest("rtt_ms", f"only with action \"slow\", in [0, {MAX_RTT_MS:g}]")
    return web.json_response({"conditions": await control.act(action, rtt_ms)})
