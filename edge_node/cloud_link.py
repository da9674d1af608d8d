"""The edge's link to the cloud verifier: one bidirectional gRPC stream per session, resumed on break.

Guarantees:
- Every wait has a deadline: opening a stream and each round's verdict. A verdict later than
  the round deadline, a broken stream or an error status raises `LinkError`; the caller decides
  whether to `resume` (new stream, committed tokens resent) or fall back to the device.
- The round deadline follows the round (`LinkDeadline`, `tandem_core.deadline`): learnt from the
  verdicts that came normally on this link, each split into the cloud's own time for the round
  (its ServerTiming) and the rest (the link), counted from the round's send (for a round sent
  ahead, from the verdict before it), never above `round_timeout_s` (the ceiling, waited from
  the start of the wait as before until enough rounds are measured, and always without an
  adaptive `LinkDeadline`). A round sent before its stream's SessionOpened came waits the
  ceiling and is not learnt from. Once learnt, a round still unanswered after 100 ms checks the
  link, and again each check time (the quickest quarter of rounds) while it waits: a
  check unanswered within its learnt timeout gives the round up at once (a black-holed link); an
  answered one lets it wait on (a slow cloud). A check is a call to a method no server implements
  (`_CHECK_METHOD`) on the stream's channel: the first gRPC server on the path (the cloud's
  gateway, or the cloud node) answers it UNIMPLEMENTED at once, without a replica, so it times
  the link alone. Each stream also checks once as it opens, to time the link as it is now (a
  bound on the check timeout, not learnt from); until a check or a round not sent ahead has
  timed it, no check gives a round up.
- `resume(generated)` opens a fresh stream whose SessionSpec carries every committed token, so
  the cloud (any replica) re-prefills and continues exactly; gRPC never retries a stream after
  its first response, so this is the protocol's own retry.
- Bytes are counted per direction as gRPC message bytes (serialized size plus the 5-byte
  length prefix), so figures are comparable across runs.
- INVALID_ARGUMENT and other client errors raise `CloudRejected` and are never retried.
  RESOURCE_EXHAUSTED and UNAVAILABLE "draining" (a replica shutting down) are resumable refusals
  (`SwitchCause.CLOUD_REFUSED`).
- Drafts stay within the cloud's limits once its SessionOpened is known: `draft_room` gives the
  largest k it verifies (`max_draft_len`, and max_context - position - 1), and
  `RemoteVerifier` drops drafts past it; before that the cloud drops them itself. An answer that reaches the cloud's
  context ends with finish reason "length".
- Trusts nothing: a reply out of order, or a verdict that `tandem_core.verdict_check` rejects
  against the drafts sent (count, prefix, budget, vocabulary, finish), raises `ProtocolError`
  and nothing from it is committed; `RemoteVerifier` resumes the session with the committed
  tokens, and past `max_bad_verdicts` gives up with `SwitchCause.BAD_VERDICT`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from protos.enums import finish_from_proto
from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc, common_pb2
from tandem_core.deadline import DeadlinePolicy, RoundDeadline
from tandem_core.link_health import backoff_delay
from tandem_core.loop import Assume, Draft, SwitchCause, VerifierUnavailable
from tandem_core.sampling import SamplingParams
from tandem_core.verdict_check import BadVerdict, check_verdict
from tandem_core.verify import Verdict

log = logging.getLogger(__name__)

_END = object()
_CHECK_METHOD = "/tandem.v1.LinkCheck/Ping"  # implemented nowhere: any status but these two is an answer
_CHECK_DEAD = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
_CHECK_POLL_S = 0.005  # while a link check runs, how often the stream is looked at
_GRPC_PREFIX = 5  # gRPC length-prefixed message framing
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL,
              grpc.StatusCode.UNKNOWN}


class LinkError(VerifierUnavailable):
    """The stream broke, or a reply missed its deadline: resumable. `cause` says which."""

    def __init__(self, message: str, cause: SwitchCause = SwitchCause.BROKEN_STREAM) -> None:
        super().__init__(cause, message)


class ProtocolError(LinkError):
    """The cloud's reply broke the protocol (out of order, or a verdict that contradicts the
    round): nothing from it is committed; resumable like a broken stream."""

    def __init__(self, message: str) -> None:
        super().__init__(message, SwitchCause.BAD_VERDICT)


class CloudRejected(Exception):
    """The cloud refused the request (bad input): not resumable."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"cloud rejected the request ({code.name}): {message}")
        self.code = code


@dataclass(frozen=True)
class SessionRequest:
    """What opening (or resuming) a cloud session needs."""

    session_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int
    max_new_tokens: int
    model: str = ""


def sampling_to_proto(params: SamplingParams, seed: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed)


def q_rows_to_proto(q: np.ndarray | None) -> list[common_pb2.SparseDist]:
    """Each q row as (ids, probs) over its support; the probs are float32-exact (cap_support)."""
    if q is None:
        return []
    rows = []
    for row in q:
        ids = np.flatnonzero(row)
        rows.append(common_pb2.SparseDist(ids=ids.tolist(), probs=row[ids].astype(np.float32).tolist()))
    return rows


def _start_reader(call: Iterator[Any], into: queue.Queue) -> threading.Thread:
    """A thread that moves a call's replies into `into`, then its error (if any), then _END, so
    the caller can wait on the queue with a timeout."""
    def read() -> None:
        try:
            for item in call:
                into.put(item)
        except grpc.RpcError as exc:
            into.put(exc)
        finally:
            into.put(_END)

    thread = threading.Thread(target=read, daemon=True, name="cloud-link-reader")
    thread.start()
    return thread


def _link_error(err: grpc.RpcError) -> Exception:
    """A broken stream is resumable (LinkError); a refusal is not (CloudRejected)."""
    code, details = err.code(), err.details() or ""
    if code in _RETRYABLE:
        refused = code == grpc.StatusCode.RESOURCE_EXHAUSTED or (
            code == grpc.StatusCode.UNAVAILABLE and details.startswith("draining"))
        return LinkError(f"stream broke: {code.name} {details}",
                         SwitchCause.CLOUD_REFUSED if refused else SwitchCause.BROKEN_STREAM)
    return CloudRejected(code, details)


class _Stream:
    """One Verify call: requests fed from a queue, responses read by a thread into a queue."""

    def __init__(self, stub: cloud_pb2_grpc.CloudVerifierStub, total_timeout_s: float) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._call = stub.Verify(iter(self._requests.get, _END), timeout=total_timeout_s)
        self._reader = _start_reader(self._call, self._responses)

    def send(self, request: cloud_pb2.VerifyRequest) -> None:
        self._requests.put(request)

    def recv(self, timeout_s: float) -> cloud_pb2.VerifyResponse:
        try:
            item = self._responses.get(timeout=timeout_s)
        except queue.Empty:
            raise LinkError(f"no reply within {timeout_s * 1000:.0f} ms", SwitchCause.LATE_VERDICT) from None
        if isinstance(item, grpc.RpcError):
            raise _link_error(item)
        if item is _END:
            raise LinkError("stream ended without a reply")
        return item

    def waiting(self) -> int:
        return self._responses.qsize()

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()


class LinkDeadline:
    """A `tandem_core.deadline.RoundDeadline` shared by the sessions over one link (they all
    measure it), behind a lock: what one answer learnt serves the next. The default never adapts:
    every round waits the ceiling, unchecked."""

    def __init__(self, deadline: RoundDeadline | None = None) -> None:
        self._lock = threading.Lock()
        self._deadline = deadline if deadline is not None else RoundDeadline(DeadlinePolicy(adaptive=False))

    @property
    def adaptive(self) -> bool:
        return self._deadline.policy.adaptive

    def deadline_s(self, rows: int, ceiling_s: float, fastest_s: float | None = None) -> float:
        with self._lock:
            return self._deadline.deadline_s(rows, ceiling_s, fastest_s)

    def plan(self, rows: int, ceiling_s: float, fastest_s: float | None) -> tuple[float, float, float]:
        """(deadline, first check, then each) for a round of `rows` rows."""
        with self._lock:
            d = self._deadline
            deadline_s = d.deadline_s(rows, ceiling_s, fastest_s)
            return deadline_s, d.first_check_s(deadline_s), d.check_after_s(rows, deadline_s)

    def check_timeout_s(self, fastest_s: float | None) -> float | None:
        with self._lock:
            return self._deadline.check_timeout_s(fastest_s)

    def observe(self, rows: int, latency_s: float, server_s: float = 0.0, *, ahead: bool = False) -> None:
        with self._lock:
            self._deadline.observe(rows, latency_s, server_s, ahead=ahead)

    def observe_check(self, latency_s: float) -> None:
        with self._lock:
            self._deadline.observe_check(latency_s)

    def missed(self) -> None:
        with self._lock:
            self._deadline.missed()


class CloudLink:
    """A speculative session's verifier in the cloud, reached over one resumable stream."""

    def __init__(self, channel: grpc.Channel, request: SessionRequest, *, round_timeout_s: float = 5.0,
                 open_timeout_s: float = 30.0, total_timeout_s: float = 3600.0,
                 deadline: LinkDeadline | None = None) -> None:
        self._stub = cloud_pb2_grpc.CloudVerifierStub(channel)
        self._channel = channel  # also for the link checks (adaptive deadlines only)
        self._request = request
        self.round_timeout_s = round_timeout_s  # the ceiling of every round's deadline
        self.deadline = deadline if deadline is not None else LinkDeadline()
        # Per round of the current stream: (sent at, rows, sent before its SessionOpened came).
        self._sent: dict[int, tuple[float, int, bool]] = {}
        self._last_verdict_at = 0.0
        self._first_reserved = False  # opened with first_round, SessionOpened not read yet
        self._fastest_s: float | None = None  # the smallest link part on the current stream (deadline_s)
        self._trip_s: float | None = None  # its smallest link round trip since the open (checks, rounds)
        self._opening_trip_s: float | None = None  # the opening check's (set by its callback)
        self._opened_server_s = 0.0  # the cloud's time for the current stream's open (queue + prefill)
        self.open_timeout_s = open_timeout_s
        self._total_timeout_s = total_timeout_s
        self._stream: _Stream | None = None
        self._round = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.rounds_sent = 0
        self.resumes = 0
        self.opened: cloud_pb2.SessionOpened | None = None
        self.server_verify_ms = 0.0
        # What the cloud's ServerTiming reported, over every stream of the session (0 if it does not).
        self.prefill_tokens = 0  # tokens it ran through the target to build the KV cache
        self.reused_tokens = 0  # tokens whose KV came from its prefix cache
        self.batch_sessions: list[int] = []  # per verdict: sessions that shared its forward pass

    def _send(self, request: cloud_pb2.VerifyRequest) -> None:
        assert self._stream is not None
        self.bytes_up += request.ByteSize() + _GRPC_PREFIX
        self._stream.send(request)

    def _recv(self, timeout_s: float) -> cloud_pb2.VerifyResponse:
        assert self._stream is not None
        response = self._stream.recv(timeout_s)
        self.bytes_down += response.ByteSize() + _GRPC_PREFIX
        self._count_timing(response)
        return response

    def _count_timing(self, response: cloud_pb2.VerifyResponse) -> None:
        kind = response.WhichOneof("kind")
        timing = response.opened.timing if kind == "opened" else response.verdict.timing
        self.prefill_tokens += timing.prefill_tokens
        self.reused_tokens += timing.reused_tokens
        if kind == "verdict":
            self.batch_sessions.append(timing.batch_sessions)

    def open(self, generated: Sequence[int] = (), *, wait: bool = False, first_round: bool = False) -> int | None:
        """Open a stream for the session, carrying `generated` committed tokens on resume.

        The SessionOpened reply is read together with the first verdict unless `wait` is set,
        so opening costs no extra round trip. With `first_round`, the cloud answers a round with
        no drafts right after SessionOpened (SessionSpec.first_round): its number is returned,
        for `recv_verdict`, and the rounds sent later are numbered after it.
        """
        self.close()
        r = self._request
        spec = cloud_pb2.SessionSpec(session_id=r.session_id, model=r.model, prompt_tokens=list(r.prompt_ids),
                                     sampling=sampling_to_proto(r.params, r.seed),
                                     max_new_tokens=r.max_new_tokens, generated_tokens=list(generated),
                                     first_round=first_round)
        try:
            self._stream = _Stream(self._stub, self._total_timeout_s)
        except grpc.RpcError as exc:  # the channel can fail fast when the peer is down
            raise LinkError(f"cannot open a stream: {exc}") from None
        self.opened = None
        self._sent, self._fastest_s, self._opened_server_s = {}, None, 0.0
        self._trip_s = self._opening_trip_s = None
        self._last_verdict_at = 0.0  # when the last verdict was read (a round sent ahead starts there)
        self._send(cloud_pb2.VerifyRequest(open=spec))
        if self.deadline.adaptive:
            self._check_at_open()
        first = None
        self._first_reserved = first_round
        if first_round:  # the protocol numbers it 1; later rounds follow it
            first, self._round = 1, max(self._round, 1)
            self._sent[first] = (time.monotonic(), 1, True)
        if wait:
            self._await_opened(self.open_timeout_s)
        return first

    def _await_opened(self, timeout_s: float) -> None:
        if self.opened is None:
            response = self._recv(timeout_s)
            if response.WhichOneof("kind") != "opened":
                raise ProtocolError("the cloud did not acknowledge the session")
            self.opened = response.opened
            self._opened_server_s = _server_s(response.opened.timing)
            if self._first_reserved and not self.opened.pipelining:  # an older cloud: ask for round 1 now
                self._send(cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(round=1)))
            self._first_reserved = False

    @property
    def pipelining(self) -> bool:
        """Whether the cloud takes rounds ahead (known once its SessionOpened came)."""
        return self.opened is not None and self.opened.pipelining

    def resume(self, generated: Sequence[int]) -> None:
        self.resumes += 1
        log.info("resuming cloud session %s after %d tokens", self._request.session_id, len(generated))
        self.open(generated)

    def draft_room(self, wanted: int, position: int) -> int:
        """The drafts worth sending after `position` tokens (prompt + committed): at most `wanted`,
        within the cloud's max_draft_len and context once its SessionOpened has come."""
        if self.opened is None:
            return wanted
        return max(0, min(wanted, self.opened.max_draft_len, self.opened.max_context - position - 1))

    def replies_waiting(self) -> int:
        """Replies (or a stream error) received and not read yet."""
        return self._stream.waiting() if self._stream is not None else 0

    def send_round(self, draft_tokens: Sequence[int], q: np.ndarray | None, assume: Assume | None = None) -> int:
        """Send one round (with `assume`, tagged with what it assumes); returns its round number."""
        if self._stream is None:
            raise LinkError("no open stream")
        self._round += 1
        self._sent[self._round] = (time.monotonic(), len(draft_tokens) + 1, self.opened is None)
        self._send(cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(
            round=self._round, draft_tokens=list(draft_tokens), q_rows=q_rows_to_proto(q),
            assume_position=0 if assume is None else assume.position,
            assume_token=0 if assume is None else assume.token)))
        self.rounds_sent += 1
        return self._round

    def recv_verdict(self, round_no: int) -> tuple[Verdict, bool]:
        """Wait for round `round_no`'s verdict (the first also waits for the open ack); returns it
        and whether the cloud dropped the round (its assumption failed)."""
        if self._stream is None:
            raise LinkError("no open stream")
        self._await_opened(self.open_timeout_s)
        response = self._await_verdict(round_no)
        if response.WhichOneof("kind") != "verdict" or response.verdict.round != round_no:
            raise ProtocolError(f"out-of-order reply from the cloud (round {round_no} awaited)")
        v = response.verdict
        self._learn(round_no, v.dropped, _server_s(v.timing))
        self.server_verify_ms += v.timing.verify_ms
        return Verdict(accepted=v.accepted, tokens=tuple(v.tokens), finished=v.finished,
                       finish_reason=finish_from_proto(v.finish_reason)), v.dropped

    # Issue 15.3, deadlines that follow the round: a round's verdict is late once `deadline` (learnt
    # from this link's rounds, below `round_timeout_s`) has passed since its wait started (its
    # send; for a round sent ahead, the verdict before it), or at once when the link answers no
    # check; checks are made after `first_check`, then each `check_after`, while it waits. At the ceiling it waits
    # `round_timeout_s` from now, as before; not learnt yet (or not adaptive), unchecked. A round
    # sent before the SessionOpened came (the cloud's prefill is in it) waits so too and is not
    # learnt from; its link part, those of the rounds not sent ahead and the answered checks on
    # this stream bound its later deadlines and checks from below (`fastest_s`: the link now).
    def _await_verdict(self, round_no: int) -> cloud_pb2.VerifyResponse:
        sent_at, rows, first = self._sent.get(round_no, (0.0, 1, True))
        start, called = max(sent_at, self._last_verdict_at), time.monotonic()
        ceiling_s = self.round_timeout_s
        deadline_s, first_check_s, check_s = (ceiling_s,) * 3 if first else \
            self.deadline.plan(rows, ceiling_s, self._fastest_s)
        log.debug("round %d (%d rows): deadline %.0f ms, check after %.0f ms, ceiling %.0f ms", round_no, rows,
                  1000 * deadline_s, 1000 * check_s, 1000 * ceiling_s)
        if check_s >= ceiling_s:
            return self._recv(ceiling_s)
        end = start + deadline_s if deadline_s < ceiling_s else called + ceiling_s  # the ceiling: as before
        check_at = start + first_check_s
        while check_at < end:
            try:
                return self._recv_late(check_at)
            except _Late:
                pass
            self._check_link(round_no, start, end, deadline_s)
            check_at = max(check_at + check_s, time.monotonic())
        try:
            return self._recv_late(end)
        except _Late:
            if deadline_s >= ceiling_s:
                raise LinkError(f"no reply within {1000 * ceiling_s:.0f} ms", SwitchCause.LATE_VERDICT) from None
            self.deadline.missed()
            raise LinkError(f"no reply within {1000 * deadline_s:.0f} ms of sending round {round_no} (the learnt "
                            f"deadline; ceiling {1000 * ceiling_s:.0f} ms)", SwitchCause.LATE_VERDICT) from None

    def _recv_late(self, until: float) -> cloud_pb2.VerifyResponse:
        """The next reply, or `_Late` when none came by `until` (monotonic)."""
        try:
            return self._recv(max(0.0, until - time.monotonic()))
        except LinkError as exc:
            if exc.cause != SwitchCause.LATE_VERDICT:
                raise
            raise _Late from None

    def _check_link(self, round_no: int, start: float, end: float, deadline_s: float) -> None:
        """Check the link until `end` at most; raise LinkError when it answers within no learnt
        timeout, else learn how long it took. A reply or a break on the stream ends the check at
        once; unlearnt (or the link not timed since the open), it ends nothing."""
        trip_s = self._link_trip_s()
        timeout_s = None if trip_s is None else self.deadline.check_timeout_s(trip_s)
        wait = end - time.monotonic() if timeout_s is None else min(timeout_s, end - time.monotonic())
        if wait <= 0:
            return
        done, t0 = threading.Event(), time.monotonic()
        check = self._check_call(wait)
        check.add_done_callback(lambda _: done.set())
        while not done.wait(_CHECK_POLL_S):
            if self.replies_waiting():
                check.cancel()
                return
        if _answered(check):
            took = time.monotonic() - t0
            self.deadline.observe_check(took)
            self._trip_s = took if self._trip_s is None else min(self._trip_s, took)
            self._fastest_s = took if self._fastest_s is None else min(self._fastest_s, took)
        elif timeout_s is not None and wait >= timeout_s and not self.replies_waiting():
            self.deadline.missed()
            raise LinkError(f"no reply within {1000 * (time.monotonic() - start):.0f} ms of sending round {round_no}, "
                            f"and no answer to a link check within {1000 * timeout_s:.0f} ms (the learnt check; "
                            f"deadline {1000 * deadline_s:.0f} ms)", SwitchCause.LATE_VERDICT)

    def _check_at_open(self) -> None:
        """Time the link as the stream opens, in the background (for this stream only)."""
        t0, stream = time.monotonic(), self._stream

        def answered(check: grpc.Future) -> None:  # not learnt from: it races both prefills for the CPU
            if _answered(check) and stream is self._stream:
                self._opening_trip_s = time.monotonic() - t0  # one assignment: read by the waiting thread
        self._check_call(self.open_timeout_s).add_done_callback(answered)

    def _check_call(self, timeout_s: float) -> grpc.Future:
        return self._channel.unary_unary(_CHECK_METHOD).future(b"", timeout=timeout_s)

    def _link_trip_s(self) -> float | None:
        """The smallest link round trip timed on this stream (None: not yet)."""
        known = [t for t in (self._trip_s, self._opening_trip_s) if t is not None]
        return min(known) if known else None

    def _learn(self, round_no: int, dropped: bool, server_s: float) -> None:
        """Feed a verdict's latency and the cloud's time for it to the deadline; a dropped round
        skipped the verification pass."""
        sent_at, rows, first = self._sent.pop(round_no, (0.0, 1, True))
        # Learnt from where its wait started: the send, or for a round sent ahead the verdict
        # before it (it waited behind that one's pass, which its own server time leaves out).
        now, previous = time.monotonic(), self._last_verdict_at
        self._last_verdict_at = now
        if dropped or not sent_at:
            return
        ahead, latency_s = sent_at < previous, now - max(sent_at, previous)
        if not ahead:  # its link part is a whole round trip (and the stream's open, for a first one)
            link_s = max(0.0, latency_s - server_s - (self._opened_server_s if first else 0.0))
            self._fastest_s = link_s if self._fastest_s is None else min(self._fastest_s, link_s)
            if not first:
                self._trip_s = link_s if self._trip_s is None else min(self._trip_s, link_s)
        if not first:
            self.deadline.observe(rows, latency_s, server_s, ahead=ahead)

    @property
    def request(self) -> SessionRequest:
        return self._request

    @property
    def is_open(self) -> bool:
        return self._stream is not None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def _answered(check: grpc.Future) -> bool:
    """Whether a link check came back over the link (UNIMPLEMENTED, or any status but no answer)."""
    error = check.exception()
    return not (isinstance(error, grpc.RpcError) and error.code() in _CHECK_DEAD)


class _Late(Exception):
    """No reply by the time asked (internal to `CloudLink._await_verdict`)."""


def _server_s(timing: cloud_pb2.ServerTiming) -> float:
    """The cloud's own time in a reply (0 from a cloud that does not report it)."""
    return max(0.0, timing.queue_ms + timing.prefill_ms + timing.verify_ms) / 1000


def _with_deadlines(call: Iterator[cloud_pb2.GenerateResponse], first_timeout_s: float | None,
                    gap_timeout_s: float | None) -> Iterator[cloud_pb2.GenerateResponse]:
    """Yield a server stream's replies, raising LinkError when one is later than its deadline.

    A reader thread feeds a queue so the wait can time out; the call is cancelled on any exit.
    """
    replies: queue.Queue = queue.Queue()
    _start_reader(call, replies)
    timeout, first = first_timeout_s, True
    try:
        while True:
            try:
                item = replies.get(timeout=timeout)
            except queue.Empty:
                raise LinkError(f"no reply within {timeout * 1000:.0f} ms",  # type: ignore[operator]
                                SwitchCause.LATE_VERDICT) from None
            if item is _END:
                return
            if isinstance(item, grpc.RpcError):
                raise _link_error(item)
            if first:
                first, timeout = False, gap_timeout_s
            yield item
    finally:
        call.cancel()  # type: ignore[attr-defined]


def cloud_generate(channel: grpc.Channel, prompt_ids: Sequence[int], params: SamplingParams, seed: int,
                   max_new_tokens: int, *, timeout_s: float = 3600.0, first_timeout_s: float | None = None,
                   gap_timeout_s: float | None = None, max_resumes: int = 3, backoff_s: float = 0.2,
                   counter: dict[str, int] | None = None) -> Iterator[cloud_pb2.GenerateResponse]:
    """Cloud-only generation over a server stream; on a break it re-asks with the tokens received.

    Each response is yielded once; `counter` (if given) accumulates "up"/"down" message bytes
    and counts "resumes".
    The first reply (prefill included) must come within `first_timeout_s` and each later one
    within `gap_timeout_s` of the previous (None = no limit), else the stream counts as broken.
    A break past `max_resumes` raises `LinkError`; a refusal raises `CloudRejected`.
    """
    stub = cloud_pb2_grpc.CloudVerifierStub(channel)
    generated: list[int] = []
    counter = counter if counter is not None else {}
    resumes = 0
    while True:
        request = cloud_pb2.GenerateRequest(session=cloud_pb2.SessionSpec(
            session_id=uuid.uuid4().hex, prompt_tokens=list(prompt_ids), sampling=sampling_to_proto(params, seed),
            max_new_tokens=max_new_tokens, generated_tokens=generated))
        counter["up"] = counter.get("up", 0) + request.ByteSize() + _GRPC_PREFIX
        try:
            call = stub.Generate(request, timeout=timeout_s)
            for response in _with_deadlines(call, first_timeout_s, gap_timeout_s):
                counter["down"] = counter.get("down", 0) + response.ByteSize() + _GRPC_PREFIX
                generated.extend(response.tokens)
                yield response
                if response.finished:
                    return
            raise LinkError("the stream ended before the answer finished")
        except LinkError as exc:
            if resumes >= max_resumes:
                raise LinkError(f"cloud unreachable after {resumes} resumes: {exc}", exc.cause) from None
            time.sleep(backoff_delay(resumes, backoff_s))
            resumes += 1
            counter["resumes"] = resumes
            log.info("cloud Generate stream broke (%s); resuming after %d tokens", exc, len(generated))


_HELD = -2  # a round not sent yet: it waits for the cloud's SessionOpened (`RemoteVerifier._send`)


@dataclass
class _Sent:
    """A round in flight: the draft, what it assumes, the drafts sent and its round number."""

    draft: Draft
    assume: Assume | None
    keep: int = 0
    round_no: int = -1  # -1: not sent on the current stream
    doomed: bool = False  # its guess failed: the cloud drops it, and `collect` reads past its reply


class RemoteVerifier:
    """A `tandem_core.loop.Verifier` in the cloud: each round over `link`, resumed on a break.

    It keeps the committed tokens, so a broken stream re-opens with all of them and the same
    round is re-sent, up to `max_resumes` times per request with `backoff_delay` between tries;
    then the last `LinkError` (a `VerifierUnavailable` with its cause) propagates.
    Every verdict is checked against the drafts sent (`check_verdict`, with the budget left of
    the session's max_new_tokens and of the cloud's context, and token ids below `vocab` when
    given). A bad one is dropped and the session resumed at once, the same round re-sent (the
    drafter never sees it); these resumes have their own budget, `max_bad_verdicts` per request,
    past which a `ProtocolError` (cause BAD_VERDICT) propagates.
    """

    def __init__(self, link: CloudLink, *, max_resumes: int, backoff_s: float, prompt_len: int,
                 vocab: int | None = None, max_bad_verdicts: int = 2) -> None:
        self.link, self.max_resumes, self.backoff_s = link, max_resumes, backoff_s
        self.prompt_len, self.vocab = prompt_len, vocab
        self.max_bad_verdicts = max_bad_verdicts
        self.bad_verdicts = 0
        self.committed: list[int] = []
        self._out: deque[_Sent] = deque()  # rounds sent and not yet answered, oldest first

    @property
    def position(self) -> int:
        """Tokens the cloud holds before the next round: prompt + committed."""
        return self.prompt_len + len(self.committed)

    def draft_len(self, wanted: int) -> int:
        """`wanted`, within the cloud's limits (see `CloudLink.draft_room`)."""
        return self.link.draft_room(wanted, self.position)

    def start(self, first_round: bool = False) -> bool:
        """Open the stream now, so that the cloud prefills while the edge prefills its drafter and
        drafts the first round; with `first_round`, also send round 1 with no drafts (the cloud's
        prefill then yields the first token, as on the cloud-only route). Returns whether round 1
        was sent. A failure to open is left to the first round, which opens again with its
        resumes and causes."""
        if self.link.is_open:
            return False
        try:
            first = self.link.open(self.committed, first_round=first_round)
        except LinkError as exc:
            log.info("opening the cloud session early failed (%s); the first round retries", exc)
            return False
        if first is not None:  # answered with the open: the cloud's prefill yields the first token
            self._out.append(_Sent(Draft((), None), None, keep=0, round_no=first))
        return first is not None

    def verify(self, draft: Draft) -> Verdict:
        self.submit(draft)
        verdict = self.collect()
        assert verdict is not None  # a round without an assumption is never dropped
        return verdict

    def submit(self, draft: Draft, assume: Assume | None = None) -> None:
        """Send a round now; `collect` answers the rounds in the order sent."""
        if not self.link.is_open:
            self.link.open(self.committed)
        entry = _Sent(draft, assume)
        self._out.append(entry)
        try:
            self._send(entry)
        except LinkError:
            pass  # the stream is gone: `collect` resumes and sends it again

    def _send(self, entry: _Sent) -> None:
        # A round ahead waits until the cloud is known to take them (its SessionOpened), and
        # rounds after a waiting one wait too (replies come in the order sent).
        before = list(itertools.takewhile(lambda e: e is not entry, self._out))
        waiting = any(e.round_no == _HELD for e in before)
        if waiting or (entry.assume is not None and not self.link.pipelining):
            entry.round_no = _HELD
            return
        # Drafts past the cloud's limits are dropped here (the verdict accepts at most those
        # sent); the drafter's commit keeps only the accepted ones anyway.
        position = self.position if entry.assume is None else entry.assume.position
        entry.keep = self.link.draft_room(len(entry.draft.tokens), position)
        q = entry.draft.q
        entry.round_no = self.link.send_round(entry.draft.tokens[:entry.keep], None if q is None else q[:entry.keep],
                                              entry.assume)

    def expect_dropped(self) -> None:
        """The oldest round in flight not yet so marked will be dropped (its guess failed)."""
        next(e for e in self._out if e.assume is not None and not e.doomed).doomed = True

    def collect(self) -> Verdict | None:
        """The oldest round's verdict (committed here), or None if the cloud dropped it as it should
        (its assumption failed); replies of rounds marked by `expect_dropped` are read past. A
        break resumes and sends every round in flight again."""
        while True:
            entry = self._out[0]
            try:
                if entry.round_no == _HELD and not self._release(entry):
                    self._out.popleft()  # its assumption failed: an older cloud never sees it
                    if entry.doomed:
                        continue
                    return None
                if entry.round_no < 0:
                    raise LinkError("the round was never sent")
                verdict, dropped = self.link.recv_verdict(entry.round_no)
                holds = entry.assume is None or (
                    self.position == entry.assume.position and self.committed[-1:] == [entry.assume.token])
                if dropped != (not holds):
                    raise ProtocolError(f"the cloud {'dropped' if dropped else 'verified'} a round whose assumption "
                                        f"{'held' if holds else 'failed'}")
                if dropped and (verdict.accepted or verdict.tokens or verdict.finished):
                    raise ProtocolError("bad verdict: a dropped round with tokens or a finish")
                if not dropped:
                    # A round sent before the SessionOpened came may hold more drafts than the cloud
                    # verifies: it dropped those past its limits, which are known now.
                    self._check(entry.draft.tokens[:self.draft_len(entry.keep)], verdict)
            except ProtocolError as exc:
                self._drop_bad_verdict(exc)
                self._resend()
                continue
            except LinkError as exc:
                if self.link.resumes - self.bad_verdicts >= self.max_resumes:  # resumes after breaks
                    raise LinkError(f"cloud unreachable after {self.link.resumes} resumes: {exc}", exc.cause) from None
                time.sleep(backoff_delay(self.link.resumes, self.backoff_s))
                self.link.resume(self.committed)
                self._resend()
                continue
            self._out.popleft()
            self._flush()
            if dropped and entry.doomed:
                continue
            if entry.doomed:  # `holds` above was true: the caller's view and ours disagree
                raise AssertionError("a round expected to be dropped held its assumption")
            if dropped:
                return None
            self.committed.extend(verdict.tokens)
            return verdict

    def ready(self) -> bool:
        """Whether the next verdict `collect` returns is in (with the open's reply, for the first,
        and those of the dropped rounds before it), or an error."""
        if not self._out or not self.link.is_open:
            return True
        doomed = next((i for i, e in enumerate(self._out) if not e.doomed), len(self._out))
        return self.link.replies_waiting() >= doomed + (1 if self.link.opened is not None else 2)

    def _release(self, entry: _Sent) -> bool:
        """Send a waiting round now that it is the oldest; False when it need not go: a cloud
        without rounds ahead (its assumption is checked here) and a failed assumption."""
        if not self.link.pipelining and entry.assume is not None:
            if not (self.position == entry.assume.position and self.committed[-1:] == [entry.assume.token]):
                return False
            entry.assume = None  # it holds: an ordinary round now
        entry.round_no = -1
        self._send(entry)
        return True

    def _flush(self) -> None:
        """Send the waiting rounds, in order, once the cloud is known to take rounds ahead."""
        if self.link.pipelining and self.link.is_open:
            for entry in self._out:
                if entry.round_no == _HELD:
                    entry.round_no = -1
                    self._send(entry)

    def _resend(self) -> None:
        """Send every round in flight again, in order, on the stream just opened (not those
        known to be dropped)."""
        kept = [entry for entry in self._out if not entry.doomed]
        self._out.clear()
        self._out.extend(kept)
        for entry in self._out:
            entry.round_no = -1
        for entry in self._out:
            self._send(entry)

    def _check(self, sent: Sequence[int], verdict: Verdict) -> None:
        """Raise `ProtocolError` unless the cloud could have sent `verdict` for the drafts `sent`."""
        opened, remaining = self.link.opened, self.link.request.max_new_tokens - len(self.committed)
        if opened is not None:  # always, once a verdict has come
            remaining = min(remaining, opened.max_context - self.position)
        if remaining < 1:  # a SessionOpened whose context is below what the cloud already holds
            raise ProtocolError(f"a verdict with {remaining} tokens of room left")
        try:
            check_verdict(sent, verdict, remaining=remaining, vocab=self.vocab)
        except BadVerdict as exc:
            raise ProtocolError(f"bad verdict: {exc}") from None

    def _drop_bad_verdict(self, exc: ProtocolError) -> None:
        """Nothing from the reply is committed: resume the session, or give up past the limit."""
        self.bad_verdicts += 1
        log.warning("%s (%d of %d tolerated)", exc, self.bad_verdicts, self.max_bad_verdicts)
        if self.bad_verdicts > self.max_bad_verdicts:
            raise ProtocolError(f"{self.bad_verdicts} bad replies from the cloud, the last: {exc}") from None
        self.link.resume(self.committed)
