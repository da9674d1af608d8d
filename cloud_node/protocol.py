"""The CloudVerifier protocol, transport-free: bytes -> proto -> core -> proto, for every server.

The plain grpcio server (`cloud_node.servicer`) and the Ray Serve replica (`cloud_node.serve_app`)
both receive requests as serialized bytes and run them through this module, so they speak the
same protocol and answer the same statuses.

Guarantees:
- `parse` turns any bytes into a message or raises `BadRequest` (an undecodable message, bad
  UTF-8 in a string) or `ResourceExhausted` (over `MAX_MESSAGE_BYTES`); it never raises anything
  else. Unknown fields are ignored, as proto3 says.
- A Verify stream's first message must be `open` (answered by `opened`); each later `round` gets
  exactly one `verdict`, in order; a round before open, a second open, a round after the final
  verdict or an empty message is a `BadRequest`. The stream is over after a finished verdict.
- `VerifyStream.close` may run from any thread at any moment, also while `open` is still
  running: the session is closed exactly once, whenever it comes into being, and a prefill
  still running stops at its next chunk (as `open_generate`'s does once `cancelled` says so).
- While the replica drains (`Admission.draining`), opening raises `Draining`.
- A stream whose client sends nothing for `Limits.idle_s` (the wait for its next request, from
  the stream's start or its last reply) ends with `idle(...)`, a `SessionIdle` (UNAVAILABLE);
  both servers apply it, and the stream's close frees the session.
- Each open and round is counted in `cloud_node.metrics` with the timing it reports, and the
  session store's state is read right after, and again when a stream closes its session.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from cloud_node import metrics
from cloud_node.errors import BadRequest, Draining, ResourceExhausted, SessionIdle
from cloud_node.verifier import (
    DraftRound,
    GenerateChunk,
    GenerateStream,
    Opened,
    RoundVerdict,
    SessionSpec,
    Timing,
    VerifierCore,
)
from protos.enums import finish_to_proto
from protos.tandem.v1 import cloud_pb2

MAX_MESSAGE_BYTES = 4 << 20  # one request; gRPC's own default receive limit
DRAINING = "draining: this replica is shutting down; resume the session on another"  # edges match the prefix

M = TypeVar("M", bound=Message)


def parse(data: Any, cls: type[M]) -> M:
    """A `cls` message from serialized bytes (a parsed message passes through)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadRequest(f"request: expected a serialized {cls.DESCRIPTOR.full_name}, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ResourceExhausted(f"request: {len(data)} bytes exceed the limit of {MAX_MESSAGE_BYTES}")
    try:
        return cls.FromString(bytes(data))
    except (DecodeError, ValueError, RuntimeError):
        raise BadRequest(f"request: not a valid {cls.DESCRIPTOR.full_name} message (undecodable bytes "
                         "or invalid UTF-8 in a string)") from None


# --- proto <-> core ------------------------------------------------------------------------

def spec_from_proto(msg: cloud_pb2.SessionSpec) -> SessionSpec:
    s = msg.sampling
    return SessionSpec(
        session_id=msg.session_id, model=msg.model, prompt_tokens=tuple(msg.prompt_tokens),
        messages=tuple((m.role, m.content) for m in msg.messages), temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p if s.HasField("top_p") else 1.0, seed=s.seed if s.HasField("seed") else None,
        max_new_tokens=msg.max_new_tokens, generated_tokens=tuple(msg.generated_tokens))


def round_from_proto(msg: cloud_pb2.DraftRound) -> DraftRound:
    return DraftRound(msg.round, tuple(msg.draft_tokens), tuple((r.ids, r.probs) for r in msg.q_rows),
                      msg.assume_position, msg.assume_token, tuple(msg.draft_parents))


def timing_to_proto(t: Timing) -> cloud_pb2.ServerTiming:
    return cloud_pb2.ServerTiming(queue_ms=t.queue_ms, prefill_ms=t.prefill_ms, verify_ms=t.verify_ms,
                                  prefill_tokens=t.prefill_tokens, reused_tokens=t.reused_tokens,
                                  batch_sessions=t.batch_sessions)


def opened_to_proto(o: Opened) -> cloud_pb2.VerifyResponse:
    return cloud_pb2.VerifyResponse(opened=cloud_pb2.SessionOpened(
        model=o.model, prompt_len=o.prompt_len, max_draft_len=o.max_draft_len, max_context=o.max_context,
        replica=o.replica, timing=timing_to_proto(o.timing), pipelining=True, max_tree_nodes=o.max_tree_nodes))


def verdict_to_proto(v: RoundVerdict) -> cloud_pb2.VerifyResponse:
    return cloud_pb2.VerifyResponse(verdict=cloud_pb2.Verdict(
        round=v.round, accepted=v.accepted, tokens=v.tokens, finished=v.finished,
        finish_reason=finish_to_proto(v.finish_reason), timing=timing_to_proto(v.timing), dropped=v.dropped))


def chunk_to_proto(c: GenerateChunk) -> cloud_pb2.GenerateResponse:
    return cloud_pb2.GenerateResponse(tokens=c.tokens, finished=c.finished,
                                      finish_reason=finish_to_proto(c.finish_reason), timing=timing_to_proto(c.timing))


# --- per-call protocol state ---------------------------------------------------------------

class Admission:
    """Whether this replica admits new sessions; `draining` is set once, when it shuts down."""

    def __init__(self) -> None:
        self.draining = threading.Event()

    def admit(self) -> None:
        if self.draining.is_set():
            raise Draining(DRAINING)


class VerifyStream:
    """Protocol state of one Verify stream: `open` first, then rounds."""

    def __init__(self, core: VerifierCore, admission: Admission) -> None:
        self.core, self.admission = core, admission
        self.session: str | None = None
        self.finished = False
        self._opening = False
        self._closed = False
        self._lock = threading.Lock()

    def responses(self, data: Any) -> list[cloud_pb2.VerifyResponse]:
        """What one request gets: its response, and for an open with `first_round`, the verdict
        of round 1 (no drafts) after SessionOpened."""
        request = parse(data, cloud_pb2.VerifyRequest)
        first = self.handle(request)
        if request.WhichOneof("kind") == "open" and request.open.first_round and not self.finished:
            return [first, self.handle(cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(round=1)))]
        return [first]

    def handle(self, data: Any) -> cloud_pb2.VerifyResponse:
        """The response to one request (bytes or a parsed VerifyRequest)."""
        request = parse(data, cloud_pb2.VerifyRequest)
        kind = request.WhichOneof("kind")
        if kind == "open":
            return self._open(request.open)
        if kind == "round":
            if self.session is None:
                raise BadRequest("round: sent before the session was opened (the first message must be open)")
            if self.finished:
                raise BadRequest("round: the session has already finished")
            verdict = self.core.verify(self.session, round_from_proto(request.round))
            self.finished = verdict.finished
            if not verdict.dropped:  # a dropped round ran no pass
                metrics.record_round(verdict.timing)
            metrics.record_store(self.core.store)
            return verdict_to_proto(verdict)
        raise BadRequest("request: empty VerifyRequest (set open or round)")

    def _open(self, msg: cloud_pb2.SessionSpec) -> cloud_pb2.VerifyResponse:
        with self._lock:
            if self.session is not None or self._opening:
                raise BadRequest("open: this stream already has an open session; send rounds")
            self._opening = True
        self.admission.admit()
        opened = self.core.open(spec_from_proto(msg), cancelled=lambda: self._closed)
        with self._lock:
            self.session = opened.session
            closed = self._closed
        if closed:  # the stream ended while the session was being opened
            self.core.close(opened.session)
        metrics.record_open(opened.timing)
        metrics.record_store(self.core.store)
        return opened_to_proto(opened)

    def close(self) -> None:
        """Close the session (now, or as soon as a running open creates it). Idempotent."""
        with self._lock:
            self._closed = True
            session = self.session
        if session is not None:
            self.core.close(session)
            metrics.record_store(self.core.store)  # the active-sessions gauge drops now, not at the next open


def idle(limit_s: float) -> SessionIdle:
    """The error that ends a Verify stream whose client sent nothing for `limit_s` seconds."""
    return SessionIdle(f"no request for {limit_s:g} s: the session is closed; resume on a new stream")


def close_generate(core: VerifierCore, chunks: GenerateStream) -> None:
    """End a Generate stream and close its session; the store's state is read at once (as a
    Verify stream's close does)."""
    chunks.close()
    metrics.record_store(core.store)


def open_generate(core: VerifierCore, admission: Admission, data: Any,
                  cancelled: Callable[[], bool] | None = None) -> GenerateStream:
    """Validate and open a Generate call (bytes or a parsed GenerateRequest); once `cancelled`
    says the call has gone, its prefill stops (SessionGone)."""
    request = parse(data, cloud_pb2.GenerateRequest)
    if not request.HasField("session"):
        raise BadRequest("session: missing (a GenerateRequest needs its SessionSpec)")
    admission.admit()
    return core.generate(spec_from_proto(request.session), cancelled)
