"""Conversions between the orchestrator's proto messages and the SDK's typed values.

Guarantees: pure functions, no I/O. Request builders reject what the SDK can tell is wrong
before sending (an unknown route or privacy string, both or neither of prompt and messages, a
number the wire type cannot hold, such as a `deadline_s` past 4294967.295 s, and a string that
UTF-8 cannot encode, i.e. one holding a lone surrogate) with a `ValueError` whose message starts
with the argument's name, e.g. "messages[1].content: ...". Everything else (ranges, limits) is
left to the server, which answers INVALID_ARGUMENT.

Example:
    >>> request = generate_request(prompt="hi", route="local", max_new_tokens=16)
    >>> request.options.route == orchestrator_pb2.ROUTE_LOCAL
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from protos.tandem.v1 import common_pb2, orchestrator_pb2
from tandem_sdk._types import (
    PRIVACIES,
    PRIVACY_MODES,
    ROUTES,
    Citation,
    Delta,
    Document,
    LinkStatus,
    Message,
    ModelInfo,
    RouteSwitch,
    Started,
    Stats,
    Status,
)

_ROUTE = {
    "auto": orchestrator_pb2.ROUTE_AUTO,
    "local": orchestrator_pb2.ROUTE_LOCAL,
    "speculative": orchestrator_pb2.ROUTE_SPECULATIVE,
    "cloud": orchestrator_pb2.ROUTE_CLOUD,
}
_PRIVACY_MODE = {
    "strict": orchestrator_pb2.PRIVACY_MODE_STRICT,
    "cloud_quality": orchestrator_pb2.PRIVACY_MODE_CLOUD_QUALITY,
}
_PRIVACY = {"private": orchestrator_pb2.PRIVACY_PRIVATE, "shareable": orchestrator_pb2.PRIVACY_SHAREABLE}
_PRIVACY_NAME = {
    orchestrator_pb2.PRIVACY_UNSPECIFIED: "private",
    orchestrator_pb2.PRIVACY_PRIVATE: "private",
    orchestrator_pb2.PRIVACY_SHAREABLE: "shareable",
}
_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}


def choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """`value` if it is one of `allowed`, else ValueError naming the argument."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(allowed)} (got {value!r})")
    return value


def route_enum(route: str) -> orchestrator_pb2.Route:
    return _ROUTE[choice("route", route, ROUTES)]


def privacy_mode_enum(privacy: str) -> orchestrator_pb2.PrivacyMode:
    return _PRIVACY_MODE[choice("privacy", privacy, PRIVACY_MODES)]


def privacy_enum(privacy: str) -> orchestrator_pb2.Privacy:
    return _PRIVACY[choice("privacy", privacy, PRIVACIES)]


def text_value(name: str, value: object) -> str:
    """`value` if it is a string that UTF-8 can encode, else ValueError naming the argument."""
    if not isinstance(value, str):
        raise ValueError(f"{name}: must be a string (got {type(value).__name__})")  # noqa: TRY004
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name}: must be valid Unicode text (a lone surrogate {value[exc.start]!r} "
                         f"at index {exc.start})") from None
    return value


MAX_WIRE_MS = 2**32 - 1  # the deadlines travel as uint32 milliseconds


def seconds_to_ms(name: str, seconds: float | None) -> int:
    """Whole milliseconds, rounded up so any positive time stays positive; None -> 0 (none)."""
    if seconds is None:
        return 0
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name}: must be a finite number of seconds >= 0 (got {seconds!r})")
    ms = math.ceil(seconds * 1000)
    if ms > MAX_WIRE_MS:
        raise ValueError(f"{name}: must be at most {MAX_WIRE_MS / 1000} seconds (got {seconds!r})")
    return ms


def _assign(message: Any, field: str, name: str, value: object) -> None:
    """Set a proto field, turning protobuf's range/type errors into one naming the argument."""
    try:
        setattr(message, field, value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot be sent as {field} ({exc})") from None


def chat_messages(messages: Sequence[Message | Mapping[str, str]]) -> list[common_pb2.ChatMessage]:
    """Chat messages from `Message` values or {"role": ..., "content": ...} mappings."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages: must be a list of messages")  # noqa: TRY004 (one error kind)
    out = []
    for i, m in enumerate(messages):
        role, content = (m.role, m.content) if isinstance(m, Message) else _pair(i, m)
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"messages[{i}]: role and content must be strings")  # noqa: TRY004
        out.append(common_pb2.ChatMessage(role=text_value(f"messages[{i}].role", role),
                                          content=text_value(f"messages[{i}].content", content)))
    return out


def _pair(i: int, m: object) -> tuple[object, object]:
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
        raise ValueError(f"messages[{i}]: must be a Message or a mapping with role and content")
    return m["role"], m["content"]


def sampling_params(
    temperature: float | None, top_k: int | None, top_p: float | None, seed: int | None
) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams()
    for field, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            _assign(params, field, field, value)
    return params


def generate_request(
    *,
    prompt: str | None = None,
    messages: Sequence[Message | Mapping[str, str]] | None = None,
    route: str = "auto",
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    deadline_s: float | None = None,
    ttft_budget_s: float | None = None,
    privacy: str = "strict",
    use_personal_context: bool = False,
    context_chunks: int | None = None,
    category: str = "",
) -> orchestrator_pb2.GenerateTextRequest:
    """The GenerateTextRequest for `Client.generate`'s arguments (see there)."""
    if (prompt is None) == (messages is None):
        raise ValueError("prompt: give exactly one of prompt and messages")
    if prompt is not None:
        text_value("prompt", prompt)
    options = orchestrator_pb2.GenerateOptions(
        route=route_enum(route),
        privacy=privacy_mode_enum(privacy),
        use_personal_context=bool(use_personal_context),
        category=text_value("category", category),
        sampling=sampling_params(temperature, top_k, top_p, seed),
    )
    _assign(options, "deadline_ms", "deadline_s", seconds_to_ms("deadline_s", deadline_s))
    _assign(options, "ttft_budget_ms", "ttft_budget_s", seconds_to_ms("ttft_budget_s", ttft_budget_s))
    if max_new_tokens is not None:
        _assign(options, "max_new_tokens", "max_new_tokens", max_new_tokens)
    if context_chunks is not None:
        _assign(options, "context_chunks", "context_chunks", context_chunks)
    request = orchestrator_pb2.GenerateTextRequest(options=options)
    if prompt is not None:
        request.prompt = prompt
    else:
        request.messages.extend(chat_messages(messages or []))
    return request


def add_document_request(
    text: str,
    *,
    title: str,
    kind: str = "document",
    privacy: str = "private",
    source: str = "",
    idempotency_key: str = "",
) -> orchestrator_pb2.AddDocumentRequest:
    return orchestrator_pb2.AddDocumentRequest(
        title=text_value("title", title), text=text_value("text", text), kind=text_value("kind", kind),
        privacy=privacy_enum(privacy), source=text_value("source", source),
        idempotency_key=text_value("idempotency_key", idempotency_key),
    )


def list_documents_request(page_token: str, page_size: int | None) -> orchestrator_pb2.ListDocumentsRequest:
    request = orchestrator_pb2.ListDocumentsRequest(page_token=page_token)
    if page_size is not None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size: must be a positive integer (got {page_size!r})")
        _assign(request, "page_size", "page_size", page_size)
    return request


def document_id(doc_id: str) -> str:
    if not isinstance(doc_id, str) or not doc_id:
        raise ValueError(f"id: must be a non-empty string (got {doc_id!r})")
    return text_value("id", doc_id)


# --- proto -> typed values -------------------------------------------------------------------


def citation(c: orchestrator_pb2.Citation) -> Citation:
    return Citation(
        document_id=c.document_id,
        title=c.title,
        chunk_index=c.chunk_index,
        score=c.score,
        privacy=_PRIVACY_NAME.get(c.privacy, "private"),
    )


def route_switch(s: common_pb2.RouteSwitch) -> RouteSwitch:
    return RouteSwitch(
        at_token=s.at_token, from_route=s.from_route, to_route=s.to_route, reason=s.reason, at_ms=s.at_ms
    )


def delta(d: orchestrator_pb2.TextDelta) -> Delta:
    return Delta(text=d.text, tokens=tuple(d.tokens), source=d.source)


def started(s: orchestrator_pb2.GenerationStarted) -> Started:
    return Started(
        route=s.route,
        reason=s.reason,
        citations=tuple(citation(c) for c in s.citations),
        private_chunks_dropped=s.private_chunks_dropped,
        prompt_tokens=s.prompt_tokens,
    )


def stats(s: orchestrator_pb2.OrchestratorStats) -> Stats:
    """Flatten OrchestratorStats and its GenerationStats. The switches are the orchestrator's
    when it reports any, else the edge node's."""
    g = s.generation
    switches = s.switches if len(s.switches) else g.switches
    return Stats(
        route=s.route or g.route,
        reason=s.reason,
        category=s.category,
        ttft_ms=s.ttft_ms,
        tokens_per_s=s.tokens_per_s,
        orchestrator_ms=s.orchestrator_ms,
        generated_tokens=g.generated_tokens,
        finish_reason=_FINISH.get(g.finish_reason),
        acceptance_rate=g.acceptance_rate,
        mean_accepted_len=g.mean_accepted_len,
        rounds=g.rounds,
        drafted=g.drafted,
        accepted=g.accepted,
        target_forwards=g.target_forwards,
        local_tokens=g.local_tokens,
        verified_tokens=g.verified_tokens,
        resumes=g.resumes,
        bytes_up=g.bytes_up,
        bytes_down=g.bytes_down,
        edge_cpu_s=g.edge_cpu_s,
        edge_ttft_ms=g.ttft_ms,
        edge_tokens_per_s=g.tokens_per_s,
        cloud_prefill_tokens=g.cloud_prefill_tokens,
        cloud_reused_tokens=g.cloud_reused_tokens,
        drafter_prefill_tokens=g.drafter_prefill_tokens,
        drafter_prefill_ms=g.drafter_prefill_ms,
        switches=tuple(route_switch(x) for x in switches),
        citations=tuple(citation(c) for c in s.citations),
        private_chunks_dropped=s.private_chunks_dropped,
        pipeline_tries=g.pipeline_tries,
        pipeline_hits=g.pipeline_hits,
        draft_reasons=dict(g.draft_reasons),
        tree_rounds=g.tree_rounds,
        nodes=g.nodes,
    )


def document(d: orchestrator_pb2.Document) -> Document:
    return Document(
        id=d.id,
        title=d.title,
        kind=d.kind or "document",
        privacy=_PRIVACY_NAME.get(d.privacy, "private"),
        chunks=d.chunks,
        bytes=d.bytes,
        created_unix_ms=d.created_unix_ms,
        source=d.source,
        truncated=d.truncated,
    )


def status(s: orchestrator_pb2.StatusResponse) -> Status:
    link = s.link
    return Status(
        link=LinkStatus(
            state=link.state or "unknown",
            circuit=link.circuit,
            rtt_ms=link.rtt_ms,
            rtt_jitter_ms=link.rtt_jitter_ms,
            consecutive_failures=link.consecutive_failures,
            last_probe_age_s=link.last_probe_age_s,
            cloud_address=link.cloud_address,
        ),
        recent_acceptance=s.recent_acceptance,
        acceptance_by_category=dict(s.acceptance_by_category),
        models=tuple(ModelInfo(role=m.role, name=m.name, where=m.where, loaded=m.loaded) for m in s.models),
        edge_address=s.edge_address,
        documents=s.documents,
        edge_healthy=s.edge_healthy,
    )
