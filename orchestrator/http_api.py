"""The orchestrator's OpenAI-compatible HTTP endpoint (aiohttp): a thin adapter over the core.

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`,
`POST /v1/completions`, streamed (server-sent events ending with `data: [DONE]`) or not, and
`GET /openapi.json`, the request schema generated from `openai_schema`'s pydantic models, and
`GET /metrics`, Prometheus' text exposition (`orchestrator.metrics`; behind the API key like every
route: a scraper sends it with `bearer_token_file`).

Guarantees:
- Every error is a JSON body in OpenAI's shape `{"error": {message, type, param, code}}`:
  400 bad input (param names the field in the request's own terms, e.g. `max_tokens` or
  `tandem.category`), 404 unknown model (code "model_not_found") or URL, 405 wrong method,
  408 a body not received within `body_timeout_s` (`BODY_TIMEOUT_S`), 413 body over `max_body_bytes`, 429 core
  Busy (with `Retry-After`), 503 core Unavailable, 504 past the request's deadline. The status of a core error comes
  from `errors.status_of` (the one table). 500 only for a bug: a generic message with a request
  id, the details in the log. No request crashes the server.
- Errors the core raises before its first item get those statuses; an error once a stream has
  started is sent as one `data: {"error": ...}` event, and the stream ends without `[DONE]`.
- The core's generator is always closed: at the end, on error, and when the client disconnects
  mid-stream (`start_http` enables handler cancellation, so a disconnect stops a generator that is
  waiting on the cloud; a failed write does the same). A client that stops reading a stream for
  `WRITE_TIMEOUT_S` is dropped, so it cannot hold a generation slot.
- Slow clients (slowloris): a connection must deliver a complete request head within
  `header_timeout_s` of opening (or of the previous response): aiohttp's keep-alive timer runs
  from the connection's start and closes a connection still waiting for a head, however slowly
  it trickles bytes. Heads are bounded by aiohttp (request line and each header at most 8190
  bytes, at most 128 headers), bodies by `max_body_bytes` and `body_timeout_s`. (aiohttp has
  no connection cap; each held connection costs one file descriptor for at most those timeouts.)
- With an API key (`create_http_app(api_key=...)`) every request but the console's static files,
  whatever its route or method (`/v1/models` and `/openapi.json` included), must carry
  `Authorization: Bearer KEY`; any other gets 401 with `WWW-Authenticate: Bearer` and OpenAI's
  body (type "invalid_request_error", code "invalid_api_key"), before its body is read. Keys are
  compared in constant time, and no reply or log line holds the key given or expected. With
  `ssl_context` (`start_http`) it speaks HTTPS only.
- The web console (`console_api`): `GET /` and its script and style load without the key (they hold
  no data); with `console=ConsoleBackend(...)` its JSON routes under `/v1/tandem/` (documents,
  status, link control) are served behind the key like every other route.
- In a stream, the first chunk's `tandem` holds the planned route and reason, and each text
  chunk's `tandem` the source of its tokens ("verified", "target", "cloud" or "local") and their count
  (`openai_run.started_json`, `delta_json`): extra keys that OpenAI clients ignore. A delta whose
  text is held back (an unfinished character, or the start of a possible stop sequence) still gets
  a chunk, with empty content, so sources and counts arrive as the tokens are committed; the held
  text goes out with the chunk that releases it, under that chunk's source.
- Usage, the `tandem` extension and stop sequences: see `openai_run`. `stop` is applied here:
  the text is cut before the first stop sequence, finish_reason is "stop" and the core's
  generator is closed at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from orchestrator import console_api, errors, metrics
from orchestrator.console_api import ConsoleBackend
from orchestrator.openai_run import GenerationRun, StopMatcher, delta_json, started_json, tandem_json
from orchestrator.openai_schema import (
    ApiError,
    Envelope,
    JsonObj,
    Kind,
    ParsedRequest,
    chunk_json,
    decode_body,
    openapi_document,
    parse_request,
    response_json,
    usage_chunk_json,
)
from protos.tandem.v1 import orchestrator_pb2
from tandem.security import bearer_from, same_secret

logger = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0  # a connection's request head must be complete within this
BODY_TIMEOUT_S = 30.0  # a request body must be received within this
WRITE_TIMEOUT_S = 30.0  # a streamed piece must be taken by the client within this
# Core fields whose name differs in the OpenAI request; other "options.X" are "tandem.X".
_PARAMS = {"options.max_new_tokens": "max_tokens", "options.sampling": "temperature", "options.route": "model",
           "request": None}


class GenerationCore(Protocol):
    def generate(
        self, request: orchestrator_pb2.GenerateTextRequest
    ) -> AsyncIterator[orchestrator_pb2.GenerateTextResponse]:
        """An async generator: one `started`, then `delta`s, then exactly one `stats`."""
        ...

    def model_ids(self) -> list[str]: ...


CORE_KEY = web.AppKey("tandem_core", GenerationCore)
MAX_BODY_KEY = web.AppKey("tandem_max_body_bytes", int)
BODY_TIMEOUT_KEY = web.AppKey("tandem_body_timeout_s", float)
METRICS_KEY = web.AppKey("tandem_metrics_text", Callable[[], bytes])


# --- the aiohttp app ---


def create_http_app(core: GenerationCore, *, max_body_bytes: int = 4 << 20,
                    body_timeout_s: float = BODY_TIMEOUT_S, api_key: str | None = None,
                    metrics_text: Callable[[], bytes] = metrics.exposition,
                    console: ConsoleBackend | None = None) -> web.Application:
    """The OpenAI-compatible app over `core`; bodies over `max_body_bytes` get 413, bodies not
    received within `body_timeout_s` 408; with `api_key`, requests without it 401. `GET /metrics`
    answers `metrics_text()` (Prometheus' text format), behind the same key. `GET /` is the web
    console; with `console`, its JSON routes too (`console_api`)."""
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes: must be positive (got {max_body_bytes})")
    if not body_timeout_s > 0:
        raise ValueError(f"body_timeout_s: must be > 0 (got {body_timeout_s})")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key: must not be empty")
    middlewares = ([_key_middleware(api_key)] if api_key is not None else []) + [_error_middleware]
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    app[CORE_KEY] = core
    app[MAX_BODY_KEY] = max_body_bytes
    app[BODY_TIMEOUT_KEY] = float(body_timeout_s)
    app.router.add_get("/v1/models", _list_models)
    app.router.add_get("/v1/models/{model_id}", _get_model)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/openapi.json", _openapi)
    app[METRICS_KEY] = metrics_text
    app.router.add_get("/metrics", _metrics)
    console_api.add_static_routes(app)
    if console is not None:
        console_api.add_api_routes(app, console, _read_body)
    return app


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY]()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_http(app: web.Application, host: str, port: int, *, header_timeout_s: float = HEADER_TIMEOUT_S,
                     ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port in the running loop (port 0 picks one); (runner, bound port).
    A connection without a complete request head `header_timeout_s` after it opened (or after
    its previous response) is closed. With `ssl_context`, HTTPS only. Stop with `await runner.cleanup()`."""
    if not header_timeout_s > 0:
        raise ValueError(f"header_timeout_s: must be > 0 (got {header_timeout_s})")
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=header_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    logger.info("OpenAI-compatible endpoint on %s://%s:%d/v1", "https" if ssl_context else "http", host, bound)
    return runner, bound


def _model_json(model_id: str) -> JsonObj:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "tandem"}


async def _list_models(request: web.Request) -> web.Response:
    ids = request.app[CORE_KEY].model_ids()
    return web.json_response({"object": "list", "data": [_model_json(m) for m in ids]})


async def _get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    if model_id not in request.app[CORE_KEY].model_ids():
        raise ApiError(404, f"The model {errors.shown(model_id)} does not exist", param="model",
                       code="model_not_found")
    return web.json_response(_model_json(model_id))


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _read_body(request: web.Request) -> bytes:
    limit = request.app[BODY_TIMEOUT_KEY]
    try:
        async with asyncio.timeout(limit):
            return await request.read()
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limit:g} s", code="request_timeout") from None


async def _generate(request: web.Request, kind: Kind) -> web.StreamResponse:
    core = request.app[CORE_KEY]
    parsed = parse_request(decode_body(await _read_body(request)), kind, core.model_ids())
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    env = Envelope(kind, prefix + uuid.uuid4().hex, int(time.time()), parsed.model)
    items = core.generate(parsed.core_request)
    try:
        # Errors before the first item get a proper HTTP status (the middleware maps them).
        first = await anext(items, None)
        if parsed.stream:
            return await _stream(request, parsed, env, items, first)
        return await _complete(parsed, env, items, first)
    finally:
        await _close(items)


async def _close(items: AsyncIterator[orchestrator_pb2.GenerateTextResponse]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        logger.exception("the core's generator failed while closing")


async def _pump(
    run: GenerationRun,
    items: AsyncIterator[orchestrator_pb2.GenerateTextResponse],
    first: orchestrator_pb2.GenerateTextResponse | None,
    emit: Callable[[str, orchestrator_pb2.GenerateTextResponse | None], Awaitable[None]],
) -> None:
    """Feeds the core's items through `run` until stats, a stop sequence or the end; `emit` gets
    each piece of text and the item that released it (None for the tail flushed at the end), and
    an empty piece for a delta that commits tokens whose text is held back."""
    item = first
    while item is not None:
        text = run.feed(item)
        if text or (item.WhichOneof("kind") == "delta" and item.delta.tokens and not run.done):
            await emit(text, item)
        if run.done:
            return
        item = await anext(items, None)
    tail = run.flush()
    if tail:
        await emit(tail, None)


async def _complete(parsed: ParsedRequest, env: Envelope,
                    items: AsyncIterator[orchestrator_pb2.GenerateTextResponse],
                    first: orchestrator_pb2.GenerateTextResponse | None) -> web.Response:
    run = GenerationRun(parsed.stop)
    pieces: list[str] = []

    async def collect(text: str, item: orchestrator_pb2.GenerateTextResponse | None) -> None:
        pieces.append(text)

    await _pump(run, items, first, collect)
    body = response_json(env, "".join(pieces), run.finish_reason, run.usage(), run.tandem())
    return web.json_response(body)


async def _stream(request: web.Request, parsed: ParsedRequest, env: Envelope,
                  items: AsyncIterator[orchestrator_pb2.GenerateTextResponse],
                  first: orchestrator_pb2.GenerateTextResponse | None) -> web.StreamResponse:
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})
    await resp.prepare(request)

    async def send(obj: JsonObj | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await resp.write(f"data: {data}\n\n".encode())
        except TimeoutError:
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("the client stopped reading the stream") from None

    async def send_text(text: str, item: orchestrator_pb2.GenerateTextResponse | None) -> None:
        chunk = chunk_json(env, text, None)
        if item is not None and item.WhichOneof("kind") == "delta":
            chunk["tandem"] = delta_json(item.delta)
        await send(chunk)

    run = GenerationRun(parsed.stop)
    try:
        if env.kind == "chat":
            opening = chunk_json(env, "", None, role=True)
            if first is not None and first.WhichOneof("kind") == "started":
                opening["tandem"] = started_json(first.started)
            await send(opening)
        await _pump(run, items, first, send_text)
        await _close(items)  # a stop sequence ends the generation now, not after the trailer is written
        tandem = run.tandem()
        await send({**chunk_json(env, None, run.finish_reason), "tandem": tandem})
        if parsed.include_usage:
            await send({**usage_chunk_json(env, run.usage()), "tandem": tandem})
        await send("[DONE]")
    except ConnectionError:
        logger.info("client went away mid-stream (%s); generation stopped", env.id)
        return resp
    except Exception as err:  # noqa: BLE001 - after the headers went out, errors travel as an SSE event
        try:
            await send(_to_api_error(err).to_json())
        except ConnectionError:
            return resp
    await resp.write_eof()
    return resp


# --- errors ---


def _param(field: str) -> str | None:
    """A core field ("options.category") in the OpenAI request's terms ("tandem.category")."""
    if field in _PARAMS:
        return _PARAMS[field]
    return "tandem." + field.removeprefix("options.") if field.startswith("options.") else field


def _to_api_error(err: Exception) -> ApiError:
    if isinstance(err, ApiError):
        return err
    status = errors.status_of(err)
    message = errors.public_message(err, "the OpenAI endpoint")
    param = None
    if isinstance(err, errors.BadRequest):
        param = _param(err.field)
        message = message.removeprefix(f"{err.field}: ")
        message = f"{param}: {message}" if param else message
    return ApiError(status.http, message, param=param, type=status.type, code=status.code)


def _http_error(request: web.Request, err: web.HTTPException) -> ApiError:
    if err.status == 404:
        return ApiError(404, f"Invalid URL ({request.method} {errors.shown(request.path, 200)})", code="unknown_url")
    if err.status == 405:
        return ApiError(405, f"Method {request.method} not allowed for {errors.shown(request.path, 200)}")
    if err.status == 413:
        limit = request.app[MAX_BODY_KEY]
        return ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    return ApiError(err.status, err.reason or f"HTTP {err.status}")


_NO_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
           "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
_BAD_KEY = "Incorrect API key provided."  # never quotes the key, not even in part


def _key_middleware(api_key: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """401 in OpenAI's shape unless the request carries `Authorization: Bearer api_key`."""
    @web.middleware
    async def require_key(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        given = bearer_from(request.headers)
        if same_secret(given, api_key) or console_api.is_static(request):
            return await handler(request)
        metrics.record_auth_failure()
        err = ApiError(401, _BAD_KEY if given else _NO_KEY, code="invalid_api_key")
        return web.json_response(err.to_json(), status=401, headers={"WWW-Authenticate": "Bearer"})
    return require_key


@web.middleware
async def _error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except web.HTTPException as err:
        if err.status < 400:
            raise
        api_err = _http_error(request, err)
        headers = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
    except Exception as err:  # noqa: BLE001 - no request may crash the server; logged
        api_err = _to_api_error(err)
        wait_s = errors.retry_after_s(err)
        headers = None if wait_s is None else {"Retry-After": str(max(1, math.ceil(wait_s)))}
    return web.json_response(api_err.to_json(), status=api_err.status, headers=headers)


__all__ = ["BODY_TIMEOUT_S", "CORE_KEY", "HEADER_TIMEOUT_S", "WRITE_TIMEOUT_S", "GenerationCore", "GenerationRun",
           "StopMatcher", "create_http_app", "start_http", "tandem_json"]
