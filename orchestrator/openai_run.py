"""Folding the core's started/delta/stats stream into OpenAI terms: text, stop sequences,
finish reason, usage and the `tandem` extension.

Guarantees:
- `StopMatcher` cuts the text before the first stop sequence and never emits part of one: it
  holds back a tail that could be the start of one until the next piece decides.
- `GenerationRun.usage()`: prompt_tokens = started.prompt_tokens, completion_tokens = the core's
  generated_tokens, or the tokens of the deltas received when a stop sequence ended the answer
  before the core's statistics came.
- `tandem_json` holds route, reason, ttft_ms, tokens_per_s, acceptance_rate, local_tokens,
  verified_tokens, cloud_prefill_tokens, cloud_reused_tokens, drafter_prefill_tokens,
  drafter_prefill_ms, switches, citations, private_chunks_dropped, category,
  stopped_by_sequence; the statistics are null when the core sent none. In a stream, the first
  chunk carries `started_json` (route, reason, prompt_tokens, citations, private_chunks_dropped)
  and each text chunk `delta_json` (source, tokens) under the same `tandem` key.
"""

from __future__ import annotations

from orchestrator.openai_replies import JsonObj, usage_json
from protos.tandem.v1 import common_pb2, orchestrator_pb2


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
        "cloud_prefill_tokens": gen.cloud_prefill_tokens if gen is not None else None,
        "cloud_reused_tokens": gen.cloud_reused_tokens if gen is not None else None,
        "drafter_prefill_tokens": gen.drafter_prefill_tokens if gen is not None else None,
        "drafter_prefill_ms": round(gen.drafter_prefill_ms, 3) if gen is not None else None,
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


def started_json(started: orchestrator_pb2.GenerationStarted) -> JsonObj:
    """The `tandem` extension of a stream's first chunk: the route planned, why, and the context."""
    full = tandem_json(started, None)
    return {"route": full["route"], "reason": full["reason"], "prompt_tokens": started.prompt_tokens,
            "citations": full["citations"], "private_chunks_dropped": full["private_chunks_dropped"]}


def delta_json(delta: orchestrator_pb2.TextDelta) -> JsonObj:
    """The `tandem` extension of a streamed text chunk: where its tokens came from ("verified":
    drafts the cloud accepted; "target": the target's correction or bonus token ending a
    speculative round; "cloud": the cloud route's; "local": generated on the device) and how many
    tokens it commits."""
    return {"source": delta.source, "tokens": len(delta.tokens)}


def _privacy_name(privacy: int) -> str:
    return "shareable" if privacy == orchestrator_pb2.PRIVACY_SHAREABLE else "private"
