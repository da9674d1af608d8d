"""The orchestrator's core: validate, personalize, route, then stream the edge node's answer.

Guarantees:
- A bad request raises `BadRequest` naming the field before anything is streamed
  (`validation.parse_generate`: every field within the limits the proto documents).
- Context: the prompt (templated, personal context included) plus max_new_tokens must fit the
  route's context: the edge's drafter (`EdgeInfo.context_length`) on the local route, the
  smaller of it and `cloud_max_context` (the deployed cloud's 4096 by default) on the
  speculative and cloud routes, which also run the drafter. Under `auto`, a request that fits
  only on the device is served locally and the reason says so; one that forces a cloud route
  raises `ContextTooLong` naming the limit, as does one that fits nowhere.
- At most `max_concurrent` generations run at once (`active_generations` counts them); more
  raise `Busy` before anything is streamed. A generation ends (and frees its slot and its edge
  call) however its consumer stops: end, error, `aclose()` or cancellation.
- Error messages name no address: the edge's address goes to the log only.
- Personal context: retrieval runs on the device; with private chunks retrieved, the routing
  policy (`tandem_core.routing.decide`) either keeps the request `local` (strict privacy) or
  has them dropped before anything is sent (cloud quality). An answer written with private
  chunks in its prompt is remembered (`orchestrator.private_answers`), and so is every answer
  to a conversation that quotes one: a later request whose messages quote a remembered answer
  (a client sending the conversation back as history) is served locally in every privacy mode.
  Private text therefore only ever reaches the edge node's local route, never a prompt that the
  cloud sees.
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
import math
import time
from collections.abc import AsyncIterator

import grpc

from orchestrator.config import OrchestratorConfig
from orchestrator.errors import BadRequest, Busy, ContextTooLong, DeadlineExceeded, Unavailable
from orchestrator.link_monitor import LinkMonitor
from orchestrator.personal import Personal, citations
from orchestrator.private_answers import PrivateAnswers
from orchestrator.validation import ParsedGenerate, parse_generate
from protos.enums import route_to_edge_mode
from protos.tandem.v1 import common_pb2, edge_pb2, edge_pb2_grpc
from protos.tandem.v1 import orchestrator_pb2 as opb
from tandem_core.link_health import AcceptanceTracker
from tandem_core.routing import InvalidField, Route, RouteCosts, RouteDecision, RouteRequest, decide

log = logging.getLogger(__name__)

# model id -> the route it pins (None: the routing policy decides)
MODEL_ROUTES: dict[str, Route | None] = {"tandem": None, **{f"tandem-{r}": r for r in Route}}


@dataclasses.dataclass(frozen=True)
class _Prompt:
    """The prompt a route would be sent: messages with the personal context kept, and its size."""

    messages: list[dict[str, str]]
    tokens: int
    hits: list  # retrieval.Hit, the chunks injected
    dropped: int = 0  # private chunks withheld from it


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
        self.private_answers = PrivateAnswers()  # answers drawn from private documents
        self.requests = 0
        self.active_generations = 0  # generations holding a slot now

    def model_ids(self) -> list[str]:
        return list(MODEL_ROUTES)

    async def edge_info(self) -> edge_pb2.EdgeInfo:
        if self._edge_info is None:
            try:
                self._edge_info = await self._edge.Info(edge_pb2.EdgeInfoRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                raise _edge_down(exc, self.config.edge_address) from None
        return self._edge_info

    def _parse(self, request: opb.GenerateTextRequest) -> ParsedGenerate:
        c = self.config
        return parse_generate(request, max_prompt_chars=c.max_prompt_chars,
                              default_max_new_tokens=c.default_max_new_tokens, default_chunks=c.context_chunks)

    async def _count_tokens(self, messages: list[dict[str, str]]) -> int:
        req = edge_pb2.EdgeGenerateRequest(messages=[common_pb2.ChatMessage(**m) for m in messages])
        try:
            return (await self._edge.CountTokens(req, timeout=30)).prompt_tokens
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise BadRequest("messages", exc.details() or "rejected by the edge node") from None
            raise _edge_down(exc, self.config.edge_address) from None

    async def _plan(self, p: ParsedGenerate, request: opb.GenerateTextRequest
                    ) -> tuple[RouteDecision, list[dict[str, str]], opb.GenerationStarted, bool]:
        """Retrieve personal context, decide the route, and build the prompt that will be sent;
        the last item says whether the answer will be drawn from private documents."""
        hits = []
        if request.options.use_personal_context:
            if self.personal is None:
                raise BadRequest("options.use_personal_context", "personal context is disabled on this orchestrator")
            hits = await self.personal.search(p.messages, p.chunks)
        private = any(h.privacy == "private" for h in hits)
        history = self.private_answers.found_in(p.messages)
        full = await self._prompt(p, hits)
        decision, prompt = self._decide(p, request, full, private, history), full
        if decision.route != "local" and private:
            # Whatever the policy said, private text never goes to a route the cloud sees.
            kept = [h for h in hits if h.privacy != "private"]
            prompt = await self._prompt(p, kept, dropped=len(hits) - len(kept))
        info = await self.edge_info()
        device = int(info.context_length)
        if decision.route != "local":
            cloud = min(self.config.cloud_max_context, device)
            if not _fits(prompt.tokens, p, cloud):
                if p.override is not None:
                    raise _too_long(p, prompt.tokens, cloud, f"the {decision.route} route's")
                prompt, decision = full, _local_for_context(p, full.tokens, cloud)
        if not _fits(prompt.tokens, p, device):
            raise _too_long(p, prompt.tokens, device, "the device's")
        started = opb.GenerationStarted(route=decision.route, reason=decision.reason, citations=citations(prompt.hits),
                                        private_chunks_dropped=prompt.dropped, prompt_tokens=prompt.tokens)
        drawn_from_private = history or any(h.privacy == "private" for h in prompt.hits)
        if drawn_from_private and decision.route != "local":  # never: the policy and the drop above see to it
            raise AssertionError(f"a prompt drawn from private documents was routed {decision.route}")
        return decision, prompt.messages, started, drawn_from_private

    async def _prompt(self, p: ParsedGenerate, hits: list, dropped: int = 0) -> _Prompt:
        """The prompt with `hits` injected, and its size in tokens."""
        messages = self.personal.inject(p.messages, hits) if hits and self.personal else p.messages
        return _Prompt(messages, await self._count_tokens(messages), hits, dropped)

    def _decide(self, p: ParsedGenerate, request: opb.GenerateTextRequest, full: _Prompt, private: bool,
                history: bool) -> RouteDecision:
        o = request.options
        try:
            return decide(RouteRequest(
                prompt_tokens=full.tokens, max_new_tokens=p.max_new_tokens, override=p.override,
                deadline_ms=o.deadline_ms or None, ttft_budget_ms=o.ttft_budget_ms or None, private_context=private,
                private_history=history,
                privacy_mode=p.privacy, acceptance=self.acceptance.get(p.category), category=p.category),
                self.monitor.view(), self.costs)
        except InvalidField as exc:
            raise BadRequest(f"options.{exc.field}", str(exc)) from None

    async def generate(self, request: opb.GenerateTextRequest) -> AsyncIterator[opb.GenerateTextResponse]:
        """One answer: `started`, then deltas, then `stats` (see the module docstring)."""
        t0 = time.perf_counter()
        p = self._parse(request)
        if self._slots.locked():
            raise Busy(f"the orchestrator already runs {self.config.max_concurrent} generations")
        async with self._slots:
            self.requests += 1
            self.active_generations += 1
            pieces: list[str] | None = None  # the answer's text, when drawn from private documents
            try:
                decision, messages, started, drawn_from_private = await self._plan(p, request)
                pieces = [] if drawn_from_private else None
                yield opb.GenerateTextResponse(started=started)
                edge_req, timeout = self._edge_request(p, request, decision, messages, t0)
                orchestrator_ms = 1000 * (time.perf_counter() - t0)
                first: float | None = None
                stats: common_pb2.GenerationStats | None = None
                call = self._edge.Generate(edge_req, timeout=timeout)
                try:
                    async for msg in call:
                        if msg.WhichOneof("kind") == "delta":
                            d = msg.delta
                            if first is None and d.tokens:
                                first = time.perf_counter()
                            if pieces is not None:
                                pieces.append(d.text)
                            yield opb.GenerateTextResponse(delta=opb.TextDelta(text=d.text, tokens=d.tokens,
                                                                               source=d.source))
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
            finally:
                self.active_generations -= 1
                if pieces:  # also when the client left mid-answer: it has what was streamed
                    self.private_answers.remember("".join(pieces))

    def _edge_request(self, p: ParsedGenerate, request: opb.GenerateTextRequest, decision: RouteDecision,
                      messages: list[dict[str, str]], t0: float) -> tuple[edge_pb2.EdgeGenerateRequest, float]:
        """The edge call for the planned answer, and its timeout (the request's deadline counts from
        its arrival)."""
        c = self.config
        edge_req = edge_pb2.EdgeGenerateRequest(
            messages=[common_pb2.ChatMessage(**m) for m in messages], sampling=p.sampling,
            max_new_tokens=p.max_new_tokens, mode=route_to_edge_mode(Route(decision.route)), fallback_local=True,
            round_deadline_ms=c.round_deadline_ms,
            open_deadline_ms=min(request.options.ttft_budget_ms or c.open_deadline_ms, c.open_deadline_ms))
        if p.deadline_s is None:
            return edge_req, c.edge_timeout_s
        timeout = p.deadline_s - (time.perf_counter() - t0)
        if timeout <= 0:
            raise DeadlineExceeded("options.deadline_ms: the deadline passed while planning the answer")
        return edge_req, timeout

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
        if decode and math.isfinite(stats.tokens_per_s) and stats.tokens_per_s > 0:  # a peer's figure: never inf/NaN
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


def _fits(prompt_tokens: int, p: ParsedGenerate, context: int) -> bool:
    return prompt_tokens + p.max_new_tokens < context


def _too_long(p: ParsedGenerate, prompt_tokens: int, context: int, whose: str) -> ContextTooLong:
    return ContextTooLong(p.context_field, f"the prompt's {prompt_tokens} tokens plus max_new_tokens {p.max_new_tokens} "
                          f"do not fit {whose} context length of {context} tokens")


def _local_for_context(p: ParsedGenerate, prompt_tokens: int, cloud: int) -> RouteDecision:
    why = (f"the prompt's {prompt_tokens} tokens plus max_new_tokens {p.max_new_tokens} fit only the device's "
           f"context (the cloud's context length is {cloud} tokens)")
    return RouteDecision("local", f"local: {why}", False, {})


def _edge_down(exc: grpc.aio.AioRpcError, address: str) -> Unavailable:
    log.warning("edge node at %s: %s %s", address, exc.code().name, exc.details())
    return Unavailable(f"the edge node is unreachable ({exc.code().name})")


def _edge_error(exc: grpc.aio.AioRpcError, address: str) -> Exception:
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BadRequest("request", exc.details() or "rejected by the edge node")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Busy(exc.details() or "the edge node is busy")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("options.deadline_ms: the answer did not finish within the request's deadline")
    log.warning("edge node at %s failed a generation: %s %s", address, code.name, exc.details())
    return Unavailable(f"the edge node failed the generation ({code.name})")
