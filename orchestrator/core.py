"""The orchestrator's core: validate, personalize, route, then stream the edge node's answer.

Guarantees:
- A bad request raises `BadRequest` naming the field before anything is streamed.
- Personal context: retrieval runs on the device; with private chunks retrieved, the routing
  policy (`tandem_core.routing.decide`) either keeps the request `local` (strict privacy) or
  has them dropped before anything is sent (cloud quality). Private text therefore only ever
  reaches the edge node's local route, never a prompt that the cloud sees.
- Speculative and cloud answers always run with the edge's `fallback_local`: a round later than
  `round_deadline_ms`, a broken or hung link, continues on the device from the last committed
  token. The stream is: one `started`, deltas whose text concatenates to the answer, one `stats`.
- What a request teaches is kept: acceptance per category, a mid-answer broken stream opens the
  circuit (`LinkMonitor.report_failure`), measured speeds refine the routing cost model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import grpc

from orchestrator.config import MAX_CONTEXT_CHUNKS, MAX_NEW_TOKENS, OrchestratorConfig
from orchestrator.errors import BadRequest, Busy, DeadlineExceeded, Unavailable
from orchestrator.link_monitor import LinkMonitor
from orchestrator.personal import Personal, citations
from protos.enums import privacy_mode_from_proto, route_from_proto, route_to_edge_mode
from protos.tandem.v1 import common_pb2, edge_pb2, edge_pb2_grpc
from protos.tandem.v1 import orchestrator_pb2 as opb
from tandem_core.link_health import AcceptanceTracker, classify_prompt
from tandem_core.routing import InvalidField, Route, RouteCosts, RouteDecision, RouteRequest, decide
from tandem_core.sampling import SamplingParams

log = logging.getLogger(__name__)

# model id -> the route it pins (None: the routing policy decides)
MODEL_ROUTES: dict[str, Route | None] = {"tandem": None, **{f"tandem-{r}": r for r in Route}}


@dataclasses.dataclass(frozen=True)
class _Parsed:
    messages: list[dict[str, str]]
    override: str | None
    privacy: str
    sampling: common_pb2.SamplingParams
    max_new_tokens: int
    chunks: int
    category: str
    deadline_s: float | None


class Orchestrator:
    def __init__(self, config: OrchestratorConfig, edge_channel: grpc.aio.Channel, monitor: LinkMonitor,
                 personal: Personal | None) -> None:
        self.config = config
        self.monitor = monitor
        self.personal = personal
        self.acceptance = AcceptanceTracker()
        self.costs = RouteCosts()
        self._edge = edge_pb2_grpc.EdgeNodeStub(edge_channel)
        self._edge_info: edge_pb2.EdgeInfo | None = None
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self.requests = 0

    def model_ids(self) -> list[str]:
        return list(MODEL_ROUTES)

    async def edge_info(self) -> edge_pb2.EdgeInfo:
        if self._edge_info is None:
            try:
                self._edge_info = await self._edge.Info(edge_pb2.EdgeInfoRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                raise Unavailable(f"edge node at {self.config.edge_address} unreachable: {exc.code().name}") from None
        return self._edge_info

    def _parse(self, request: opb.GenerateTextRequest) -> _Parsed:
        if bool(request.prompt) == bool(request.messages):
            raise BadRequest("prompt", "give exactly one of prompt or messages")
        messages = [{"role": "user", "content": request.prompt}] if request.prompt else []
        for i, m in enumerate(request.messages):
            if m.role not in ("system", "user", "assistant"):
                raise BadRequest(f"messages[{i}].role", f"must be system, user or assistant, got {m.role!r}")
            messages.append({"role": m.role, "content": m.content})
        if sum(len(m["content"]) for m in messages) > self.config.max_prompt_chars:
            raise BadRequest("prompt" if request.prompt else "messages",
                             f"longer than {self.config.max_prompt_chars} characters")
        o = request.options
        try:
            route = route_from_proto(o.route)
        except ValueError:
            raise BadRequest("options.route", f"unknown value {o.route}") from None
        try:
            privacy = privacy_mode_from_proto(o.privacy)
        except ValueError:
            raise BadRequest("options.privacy", f"unknown value {o.privacy}") from None
        s = o.sampling
        try:
            SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p if s.HasField("top_p") else 1.0,
                           seed=s.seed if s.HasField("seed") else None)
        except ValueError as exc:
            raise BadRequest("options.sampling", str(exc)) from None
        if o.max_new_tokens > MAX_NEW_TOKENS:
            raise BadRequest("options.max_new_tokens", f"must be at most {MAX_NEW_TOKENS}, got {o.max_new_tokens}")
        if o.context_chunks > MAX_CONTEXT_CHUNKS:
            raise BadRequest("options.context_chunks", f"must be at most {MAX_CONTEXT_CHUNKS}")
        if len(o.category) > 64:
            raise BadRequest("options.category", "longer than 64 characters")
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        return _Parsed(messages, route, privacy, s,
                       o.max_new_tokens or self.config.default_max_new_tokens, o.context_chunks or self.config.context_chunks,
                       o.category or classify_prompt(last_user), o.deadline_ms / 1000 if o.deadline_ms else None)

    async def _count_tokens(self, messages: list[dict[str, str]]) -> int:
        req = edge_pb2.EdgeGenerateRequest(messages=[common_pb2.ChatMessage(**m) for m in messages])
        try:
            return (await self._edge.CountTokens(req, timeout=30)).prompt_tokens
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise BadRequest("messages", exc.details() or "rejected by the edge node") from None
            raise Unavailable(f"edge node at {self.config.edge_address} unreachable: {exc.code().name}") from None

    async def _plan(self, p: _Parsed, request: opb.GenerateTextRequest
                    ) -> tuple[RouteDecision, list[dict[str, str]], opb.GenerationStarted]:
        """Retrieve personal context, decide the route, and build the prompt that will be sent."""
        hits = []
        if request.options.use_personal_context:
            if self.personal is None:
                raise BadRequest("options.use_personal_context", "personal context is disabled on this orchestrator")
            hits = await self.personal.search(p.messages, p.chunks)
        private = any(h.privacy == "private" for h in hits)
        full = self.personal.inject(p.messages, hits) if hits and self.personal else p.messages
        prompt_tokens = await self._count_tokens(full)
        o = request.options
        try:
            decision = decide(RouteRequest(
                prompt_tokens=prompt_tokens, max_new_tokens=p.max_new_tokens, override=p.override,
                deadline_ms=o.deadline_ms or None, ttft_budget_ms=o.ttft_budget_ms or None, private_context=private,
                privacy_mode=p.privacy, acceptance=self.acceptance.get(p.category), category=p.category),
                self.monitor.view(), self.costs)
        except InvalidField as exc:
            raise BadRequest(f"options.{exc.field}", str(exc)) from None
        dropped = 0
        if decision.route != "local" and private:
            # Whatever the policy said, private text never goes to a route the cloud sees.
            kept = [h for h in hits if h.privacy != "private"]
            dropped, hits = len(hits) - len(kept), kept
            full = self.personal.inject(p.messages, hits) if hits and self.personal else p.messages
            prompt_tokens = await self._count_tokens(full)
        info = await self.edge_info()
        if prompt_tokens + p.max_new_tokens >= info.context_length:
            raise BadRequest("options.max_new_tokens", f"prompt of {prompt_tokens} tokens plus max_new_tokens "
                             f"{p.max_new_tokens} exceeds the context length {info.context_length}")
        started = opb.GenerationStarted(route=decision.route, reason=decision.reason, citations=citations(hits),
                                        private_chunks_dropped=dropped, prompt_tokens=prompt_tokens)
        return decision, full, started

    async def generate(self, request: opb.GenerateTextRequest) -> AsyncIterator[opb.GenerateTextResponse]:
        """One answer: `started`, then deltas, then `stats` (see the module docstring)."""
        t0 = time.perf_counter()
        p = self._parse(request)
        if self._slots.locked():
            raise Busy(f"the orchestrator already runs {self.config.max_concurrent} generations")
        async with self._slots:
            self.requests += 1
            decision, messages, started = await self._plan(p, request)
            yield opb.GenerateTextResponse(started=started)
            edge_req = edge_pb2.EdgeGenerateRequest(
                messages=[common_pb2.ChatMessage(**m) for m in messages], sampling=p.sampling,
                max_new_tokens=p.max_new_tokens, mode=route_to_edge_mode(Route(decision.route)), fallback_local=True,
                round_deadline_ms=self.config.round_deadline_ms,
                open_deadline_ms=min(request.options.ttft_budget_ms or self.config.open_deadline_ms,
                                     self.config.open_deadline_ms))
            orchestrator_ms = 1000 * (time.perf_counter() - t0)
            first: float | None = None
            stats: common_pb2.GenerationStats | None = None
            timeout = self.config.edge_timeout_s
            if p.deadline_s is not None:  # the request's deadline counts from its arrival
                timeout = p.deadline_s - (time.perf_counter() - t0)
                if timeout <= 0:
                    raise DeadlineExceeded("options.deadline_ms: the deadline passed while planning the answer")
            call = self._edge.Generate(edge_req, timeout=timeout)
            try:
                async for msg in call:
                    if msg.WhichOneof("kind") == "delta":
                        if first is None and msg.delta.tokens:
                            first = time.perf_counter()
                        d = msg.delta
                        yield opb.GenerateTextResponse(delta=opb.TextDelta(text=d.text, tokens=d.tokens, source=d.source))
                    else:
                        stats = msg.stats
            except grpc.aio.AioRpcError as exc:
                raise _edge_error(exc, self.config.edge_address) from None
            finally:
                call.cancel()
            if stats is None:
                raise Unavailable("the edge node ended the stream without statistics")
            self._learn(p.category, stats, started.prompt_tokens)
            wall = time.perf_counter() - t0
            yield opb.GenerateTextResponse(stats=opb.OrchestratorStats(
                route=decision.route, reason=decision.reason, generation=stats, switches=stats.switches,
                citations=started.citations, private_chunks_dropped=started.private_chunks_dropped,
                orchestrator_ms=orchestrator_ms, ttft_ms=1000 * ((first or time.perf_counter()) - t0),
                tokens_per_s=stats.generated_tokens / wall if wall > 0 else 0.0, category=p.category))

    def _learn(self, category: str, stats: common_pb2.GenerationStats, prompt_tokens: int) -> None:
        """Fold what this answer measured into acceptance, link health and the routing cost model."""
        if stats.rounds >= 3:  # one or two rounds (an answer that fell back at once) are noise
            self.acceptance.observe(category, stats.accepted / stats.drafted)
        for switch in stats.switches:
            # A broken stream says the link failed; a late reply may only be one slow round or a
            # tight per-request TTFT budget, and must not cut every request off the cloud. The
            # health probes (1 s timeout) catch a link that stays silent.
            if switch.to_route == "local" and switch.cause != common_pb2.SWITCH_CAUSE_LATE_VERDICT:
                self.monitor.report_failure(switch.reason)
        if stats.switches or stats.generated_tokens < 8:
            return
        updates: dict[str, float] = {}
        decode = {"local": "device_decode_tps", "cloud": "cloud_decode_tps"}.get(stats.route)
        if decode and stats.tokens_per_s > 0:
            updates[decode] = stats.tokens_per_s
        prefill = {"local": "device_prefill_tps", "cloud": "cloud_prefill_tps"}.get(stats.route)
        if prefill and prompt_tokens >= 16 and stats.ttft_ms > 0:
            updates[prefill] = prompt_tokens / (stats.ttft_ms / 1000)  # an upper bound on the wait: TTFT
        if updates:
            self.costs = dataclasses.replace(self.costs, **{f: 0.7 * getattr(self.costs, f) + 0.3 * v
                                                           for f, v in updates.items()})

    async def edge_status(self) -> edge_pb2.EdgeInfo | None:
        """A fresh Info call (the cached info is refreshed: the edge may have restarted); None
        when the edge node does not answer."""
        self._edge_info = None
        try:
            return await self.edge_info()
        except Unavailable:
            return None


def _edge_error(exc: grpc.aio.AioRpcError, address: str) -> Exception:
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BadRequest("request", exc.details() or "rejected by the edge node")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Busy(exc.details() or "the edge node is busy")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("options.deadline_ms: the answer did not finish within the request's deadline")
    return Unavailable(f"edge node at {address}: {code.name}: {exc.details()}")
