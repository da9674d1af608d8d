"""The orchestrator's OpenAI-compatible HTTP endpoint (aiohttp): a thin adapter over the core.

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`,
`POST /v1/completions`, streamed (server-sent events ending with `data: [DONE]`) or not, and
`GET /openapi.json`, the request schema generated from `openai_schema`'s pydantic models.

Guarantees:
- Every error is a JSON body in OpenAI's shape `{"error": {message, type, param, code}}`:
  400 bad input (param names the field), 404 unknown model (code "model_not_found") or URL,
  405 wrong method, 413 body over `max_body_bytes`, 429 core Busy, 503 core Unavailable, 500 for
  anything unexpected (logged). No request crashes the server.
- Errors the core raises before its first item get those statuses; an error once a stream has
  started is sent as one `data: {"error": ...}` event, and the stream ends without `[DONE]`.
- The core's generator is always closed: at the end, on error, and when the client disconnects
  mid-stream (`start_http` enables handler cancellation, so a disconnect stops a generator that is
  waiting on the cloud; a failed write does the same).
- `usage`: prompt_tokens = started.prompt_tokens, completion_tokens = the core's
  generated_tokens. Streamed, usage comes in a last chunk (`choices: []`) only when
  `stream_options.include_usage` is true, as OpenAI does.
- `tandem` extension (on the non-streamed response; streamed, on the chunk carrying
  finish_reason and on the usage chunk): route, reason, ttft_ms, tokens_per_s, acceptance_rate,
  local_tokens, verified_tokens, switches, citations, private_chunks_dropped, category,
  stopped_by_sequence.
- `stop` is applied here: the text is cut before the first stop sequence (a streamed delta never
  shows part of one), finish_reason is "stop" and the core's generator is closed at once. The
  core then sends no statistics, so the stats fields of `tandem` are null and completion_tokens
  counts the tokens of the deltas received up to the cut.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from aiohttp import web

from orchestrator import errors
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
    usage_json,
)
from protos.tandem.v1 import common_pb2, orchestrator_pb2

logger = logging.getLogger(__name__)


class GenerationCore(Protocol):
    def generate(
        self, request: orchestrator_pb2.GenerateTextRequest
    ) -> AsyncIterator[orchestrator_pb2.GenerateTextResponse]:
        """An async generator: one `started`, then `delta`s, then exactly one `stats`."""
        ...

    def model_ids(self) -> list[str]: ...


CORE_KEY = web.AppKey("tandem_core", GenerationCore)
MAX_BODY_KEY = web.AppKey("tandem_max_body_bytes", int)


class StopMatcher:
    """Cuts a text arriving in pieces before the first stop sequence; holds back a tail that
    could be the start of one, so no emitted piece ever contains part of a stop sequence."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop sequence was hit)."""
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = max((k for s in self._stops for k in range(1, len(s)) if buf.endswith(s[:k])),
                   default=0)
        self._held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class GenerationRun:
    """Folds the core's started/delta/stats stream into OpenAI terms (text, usage, finish)."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.started: orchestrator_pb2.GenerationStarted | None = None
        self.stats: orchestrator_pb2.OrchestratorStats | None = None
        self.stopped_by_sequence = False
        self._matcher = StopMatcher(stop)
        self._delta_tokens = 0

    @property
    def done(self) -> bool:
        return self.stats is not None or self.stopped_by_sequence

    def feed(self, item: orchestrator_pb2.GenerateTextResponse) -> str:
        """The text to emit for one item of the core's stream."""
        kind = item.WhichOneof("kind")
        if kind == "started":
            self.started = item.started
        elif kind == "delta":
            self._delta_tokens += len(item.delta.tokens)
            text, self.stopped_by_sequence = self._matcher.feed(item.delta.text)
            return text
        elif kind == "stats":
            self.stats = item.stats
            return self._matcher.flush()
        return ""

    def flush(self) -> str:
        return self._matcher.flush()

    @property
    def finish_reason(self) -> str:
        length = self.stats is not None and (
            self.stats.generation.finish_reason == common_pb2.FINISH_REASON_LENGTH)
        return "length" if length and not self.stopped_by_sequence else "stop"

    def usage(self) -> JsonObj:
        prompt = self.started.prompt_tokens if self.started is not None else 0
        if self.stats is not None:
            return usage_json(prompt, self.stats.generation.generated_tokens)
        return usage_json(prompt, self._delta_tokens)

    def tandem(self) -> JsonObj:
        return tandem_json(self.started, self.stats, self.stopped_by_sequence)


def tandem_json(started: orchestrator_pb2.GenerationStarted | None,
                stats: orchestrator_pb2.OrchestratorStats | None,
                stopped_by_sequence: bool = False) -> JsonObj:
    """The `tandem` extension: the orchestrator's statistics (stats fields null without stats)."""
    gen = stats.generation if stats is not None else None
    citations = list(stats.citations) if stats is not None and stats.citations else (
        list(started.citations) if started is not None else [])
    switches = list(stats.switches or stats.generation.switches) if stats is not None else []
    return {
        "route": (stats.route if stats is not None else "") or (started.route if started else ""),
        "reason": (stats.reason if stats is not None else "") or (
            started.reason if started else ""),
        "ttft_ms": round(stats.ttft_ms, 3) if stats is not None else None,
        "tokens_per_s": round(stats.tokens_per_s, 3) if stats is not None else None,
        "acceptance_rate": round(gen.acceptance_rate, 4) if gen is not None else None,
        "local_tokens": gen.local_tokens if gen is not None else None,
        "verified_tokens": gen.verified_tokens if gen is not None else None,
        "switches": [
            {"at_token": s.at_token, "from_route": s.from_route, "to_route": s.to_route,
             "reason": s.reason, "at_ms": round(s.at_ms, 3)} for s in switches],
        "citations": [
            {"document_id": c.document_id, "title": c.title, "chunk_index": c.chunk_index,
             "score": round(c.score, 4), "privacy": _privacy_name(c.privacy)} for c in citations],
        "private_chunks_dropped": (stats.private_chunks_dropped if stats is not None else (
            started.private_chunks_dropped if started is not None else 0)),
        "category": stats.category if stats is not None else None,
        "stopped_by_sequence": stopped_by_sequence,
    }


def _privacy_name(privacy: int) -> str:
    return "shareable" if privacy == orchestrator_pb2.PRIVACY_SHAREABLE else "private"


# --- the aiohttp app ---


def create_http_app(core: GenerationCore, *, max_body_bytes: int = 4 << 20) -> web.Application:
    """The OpenAI-compatible app over `core`; bodies over `max_body_bytes` get 413."""
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes: must be positive (got {max_body_bytes})")
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_error_middleware])
    app[CORE_KEY] = core
    app[MAX_BODY_KEY] = max_body_bytes
    app.router.add_get("/v1/models", _list_models)
    app.router.add_get("/v1/models/{model_id}", _get_model)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/openapi.json", _openapi)
    return app


async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port in the running loop (port 0 picks one); (runner, bound port).
    Stop with `await runner.cleanup()`."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    logger.info("OpenAI-compatible endpoint on http://%s:%d/v1", host, bound)
    return runner, bound


def _model_json(model_id: str) -> JsonObj:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "tandem"}


async def _list_models(request: web.Request) -> web.Response:
    ids = request.app[CORE_KEY].model_ids()
    return web.json_response({"object": "list", "data": [_model_json(m) for m in ids]})


async def _get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    if model_id not in request.app[CORE_KEY].model_ids():
        raise ApiError(404, f"The model '{model_id}' does not exist", param="model",
                       code="model_not_found")
    return web.json_response(_model_json(model_id))


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _generate(request: web.Request, kind: Kind) -> web.StreamResponse:
    core = request.app[CORE_KEY]
    parsed = parse_request(decode_body(await request.read()), kind, core.model_ids())
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
    emit: Callable[[str], Awaitable[None]],
) -> None:
    """Feeds the core's items through `run` until stats, a stop sequence or the end."""
    item = first
    while item is not None:
        text = run.feed(item)
        if text:
            await emit(text)
        if run.done:
            return
        item = await anext(items, None)
    tail = run.flush()
    if tail:
        await emit(tail)


async def _complete(parsed: ParsedRequest, env: Envelope,
                    items: AsyncIterator[orchestrator_pb2.GenerateTextResponse],
                    first: orchestrator_pb2.GenerateTextResponse | None) -> web.Response:
    run = GenerationRun(parsed.stop)
    pieces: list[str] = []

    async def collect(text: str) -> None:
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
        await resp.write(f"data: {data}\n\n".encode())

    async def send_text(text: str) -> None:
        await send(chunk_json(env, text, None))

    run = GenerationRun(parsed.stop)
    try:
        if env.kind == "chat":
            await send(chunk_json(env, "", None, role=True))
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
        api_err = _to_api_error(err)
        try:
            await send(api_err.to_json())
        except ConnectionError:
            return resp
    await resp.write_eof()
    return resp


# --- errors ---


def _to_api_error(err: Exception) -> ApiError:
    if isinstance(err, ApiError):
        return err
    if isinstance(err, errors.BadRequest):
        return ApiError(400, str(err), param=err.field)
    if isinstance(err, errors.NotFound):
        return ApiError(404, str(err), code="not_found")
    if isinstance(err, errors.Busy):
        return ApiError(429, str(err), type="rate_limit_error", code="rate_limit_exceeded")
    if isinstance(err, errors.Unavailable):
        return ApiError(503, str(err), type="server_error", code="service_unavailable")
    if isinstance(err, errors.DeadlineExceeded):
        return ApiError(504, str(err), type="server_error", code="deadline_exceeded")
    if isinstance(err, errors.OrchestratorError):
        return ApiError(500, str(err), type="server_error")
    logger.exception("unexpected error while serving an OpenAI request", exc_info=err)
    return ApiError(500, "internal error in the orchestrator", type="server_error")


def _http_error(request: web.Request, err: web.HTTPException) -> ApiError:
    if err.status == 404:
        return ApiError(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    if err.status == 405:
        return ApiError(405, f"Method {request.method} not allowed for {request.path}")
    if err.status == 413:
        limit = request.app[MAX_BODY_KEY]
        return ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    return ApiError(err.status, err.reason or f"HTTP {err.status}")


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
        headers = None
    return web.json_response(api_err.to_json(), status=api_err.status, headers=headers)


__all__ = ["CORE_KEY", "GenerationCore", "GenerationRun", "StopMatcher", "create_http_app", "start_http", "tandem_json"]
