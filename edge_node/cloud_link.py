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
  adaptive `LinkDeadline`). A round's rows are its drafts + 1 (a tree's nodes + 1). A round sent
  before its stream's SessionOpened came waits the ceiling and is not learnt from. Once learnt,
  a round still unanswered after 100 ms checks the link, and again every 100 ms (one check out
  at a time) while it waits: a check unanswered within its learnt timeout
  gives the round up at once (a black-holed link); an answered one lets it wait on (a slow
  cloud). A check is a call to a method no server implements (`CHECK_METHOD`) on the stream's
  channel: the first gRPC server on the path (the cloud's gateway, or the cloud node) answers it
  UNIMPLEMENTED at once, without a replica, so it times the link alone. Each stream also checks
  once as it opens, to time the link as it is now (a bound on the check timeout, not learnt
  from); until a check or a round not sent ahead has timed it, no check gives a round up. The
  wait for SessionOpened is checked every 100 ms (`link_stream.FirstReplyWatch`), and those
  answered checks are learnt (the thread only waits meanwhile).
  The checks keep the wait's clock, not the caller's: `link_failed()` advances them without
  blocking, and the speculative loop asks it between drafter passes (`RemoteVerifier.ready`), so
  a round drafted ahead while a verdict is out delays neither the check nor the fallback.
- `resume(generated)` opens a fresh stream whose SessionSpec carries every committed token, so
  the cloud (any replica) re-prefills and continues exactly; gRPC never retries a stream after
  its first response, so this is the protocol's own retry.
- Errors, byte counts and the cloud-only route are `edge_node.link_stream`'s; the verifier the
  speculative loop talks to (rounds in flight, verdicts checked, resumes) is
  `edge_node.remote_verifier.RemoteVerifier`. Both are re-exported here.
- The cloud's limits are known once its SessionOpened came: `draft_room` (the longest chain,
  or deepest tree path, it verifies: max_draft_len, and max_context - position - 1) and
  `max_tree_nodes` (the most drafts a tree round may hold; 0 before SessionOpened and from a
  replica that verifies chains only). `send_round` never sends a tree past `max_tree_nodes`, so
  never to such a replica: a tree goes out as DraftRound.draft_parents (each parent + 1), its q
  rows one per sibling group. An answer that reaches the cloud's context ends with finish
  reason "length".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from edge_node.link_stream import (
    CHECK_METHOD,
    GRPC_PREFIX,
    OPEN_POLL_S,
    CloudRejected,
    CredentialRefused,
    FirstReplyWatch,
    LinkDeadline,
    LinkError,
    ProtocolError,
    RequestCancelled,
    SessionRequest,
    VerifyStream,
    answered,
    cloud_generate,
    sampling_to_proto,
)
from edge_node.remote_verifier import RemoteVerifier
from protos.enums import finish_from_proto
from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc, common_pb2
from tandem_core.loop import Assume, SwitchCause
from tandem_core.verify import Verdict

__all__ = ["CloudLink", "CloudRejected", "CredentialRefused", "LinkDeadline", "LinkError", "ProtocolError", "RemoteVerifier",
           "RequestCancelled", "SessionRequest", "cloud_generate", "q_rows_to_proto", "sampling_to_proto"]

log = logging.getLogger(__name__)

_CHECK_POLL_S = 0.005  # while a link check runs, how often the stream is looked at


def q_rows_to_proto(q: np.ndarray | None) -> list[common_pb2.SparseDist]:
    """Each q row as (ids, probs) over its support; the probs are float32-exact (cap_support)."""
    if q is None:
        return []
    rows = []
    for row in q:
        ids = np.flatnonzero(row)
        rows.append(common_pb2.SparseDist(ids=ids.tolist(), probs=row[ids].astype(np.float32).tolist()))
    return rows


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
        self._watch: _Watch | None = None  # the wait for the verdict that comes next
        # The request's consumer has gone: the wait for SessionOpened ends (RequestCancelled).
        self.cancelled: Callable[[], bool] | None = None
        self.open_timeout_s = open_timeout_s
        self._total_timeout_s = total_timeout_s
        self._stream: VerifyStream | None = None
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
        self.bytes_up += request.ByteSize() + GRPC_PREFIX
        self._stream.send(request)

    def _recv(self, timeout_s: float) -> cloud_pb2.VerifyResponse:
        assert self._stream is not None
        response = self._stream.recv(timeout_s)
        self.bytes_down += response.ByteSize() + GRPC_PREFIX
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
            self._stream = VerifyStream(self._stub, self._total_timeout_s)
        except grpc.RpcError as exc:  # the channel can fail fast when the peer is down
            raise LinkError(f"cannot open a stream: {exc}") from None
        self.opened = None
        self._sent, self._fastest_s, self._opened_server_s = {}, None, 0.0
        self._trip_s = self._opening_trip_s = None
        self._end_watch()
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
            response = self._recv_first(timeout_s)
            if response.WhichOneof("kind") != "opened":
                raise ProtocolError("the cloud did not acknowledge the session")
            self.opened = response.opened
            self._opened_server_s = _server_s(response.opened.timing)
            if self._first_reserved and not self.opened.pipelining:  # an older cloud: ask for round 1 now
                self._send(cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(round=1)))
            self._first_reserved = False

    def _recv_first(self, timeout_s: float) -> cloud_pb2.VerifyResponse:
        """The stream's first reply (SessionOpened) within `timeout_s`, checking the link meanwhile
        (`FirstReplyWatch`; with an adaptive deadline: its learnt check timeout, else the round
        ceiling)."""
        if not self.deadline.adaptive:
            return self._recv(timeout_s)
        limit_s = self.deadline.check_timeout_s(self._link_trip_s()) or self.round_timeout_s
        # Its answered checks are learnt (this thread only waits meanwhile): with pipelined rounds
        # (drafted while a verdict is out) few other checks are, and without them no round's
        # check may give it up early.
        watch = FirstReplyWatch(self._channel, min(limit_s, self.round_timeout_s), self.cancelled,
                                on_answer=self._observe_check)
        end = time.monotonic() + timeout_s
        try:
            while (left := end - time.monotonic()) > OPEN_POLL_S:
                try:
                    return self._recv_late(time.monotonic() + OPEN_POLL_S)
                except _Late:
                    pass
                try:
                    watch.poll()
                except (LinkError, RequestCancelled):
                    if self.replies_waiting():  # it came while the check was judged
                        return self._recv(OPEN_POLL_S)
                    raise
            return self._recv(max(0.0, left))
        finally:
            watch.close()

    def await_opened(self) -> None:
        """Wait (at most `open_timeout_s`) for the current stream's SessionOpened, if not in yet."""
        if self._stream is None:
            raise LinkError("no open stream")
        self._await_opened(self.open_timeout_s)

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
        within the cloud's max_draft_len and context once its SessionOpened has come (for a tree:
        the depth it verifies)."""
        if self.opened is None:
            return wanted
        return max(0, min(wanted, self.opened.max_draft_len, self.opened.max_context - position - 1))

    def replies_waiting(self) -> int:
        """Replies (or a stream error) received and not read yet."""
        return self._stream.waiting() if self._stream is not None else 0

    @property
    def max_tree_nodes(self) -> int:
        """The most drafts a tree round may hold: 0 until the SessionOpened came, and from a
        replica that verifies chains only (then no tree may be sent)."""
        return self.opened.max_tree_nodes if self.opened is not None else 0

    def send_round(self, draft_tokens: Sequence[int], q: np.ndarray | None, assume: Assume | None = None,
                   parents: Sequence[int] | None = None) -> int:
        """Send one round (with `assume`, tagged with what it assumes); returns its round number.
        With `parents` (`tandem_core.tree`'s convention), the drafts are a tree and `q` holds one
        row per sibling group; it must fit `max_tree_nodes` (ValueError: a caller's bug)."""
        if self._stream is None:
            raise LinkError("no open stream")
        if parents and len(draft_tokens) > self.max_tree_nodes:
            raise ValueError(f"a tree of {len(draft_tokens)} drafts for a cloud that takes {self.max_tree_nodes}")
        self._round += 1
        self._sent[self._round] = (time.monotonic(), len(draft_tokens) + 1, self.opened is None)
        self._send(cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(
            round=self._round, draft_tokens=list(draft_tokens), q_rows=q_rows_to_proto(q),
            assume_position=0 if assume is None else assume.position,
            assume_token=0 if assume is None else assume.token,
            draft_parents=[a + 1 for a in parents or ()])))
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
    # `round_timeout_s` from the call, as before; not learnt yet (or not adaptive), unchecked. A round
    # sent before the SessionOpened came (the cloud's prefill is in it) waits so too and is not
    # learnt from; its link part, those of the rounds not sent ahead and the answered checks on
    # this stream bound its later deadlines and checks from below (`fastest_s`: the link now).
    # The checks run on the wait's own clock, not the caller's: `link_failed` advances them without
    # blocking, so a caller that drafts ahead while a verdict is out (and asks between its passes)
    # learns of a dead link ~100 ms after the round's wait began, not after its drafting.
    def _watch_of(self, round_no: int) -> _Watch:
        """The wait for `round_no`'s verdict (made, with its plan, on first use)."""
        w = self._watch
        if w is not None and w.round_no == round_no:
            return w
        self._end_watch()
        sent_at, rows, first = self._sent.get(round_no, (0.0, 1, True))
        ceiling_s = self.round_timeout_s
        deadline_s, first_check_s, check_s = (ceiling_s,) * 3 if first else \
            self.deadline.plan(rows, ceiling_s, self._fastest_s)
        log.debug("round %d (%d rows): deadline %.0f ms, check after %.0f ms, ceiling %.0f ms", round_no, rows,
                  1000 * deadline_s, 1000 * check_s, 1000 * ceiling_s)
        start = max(sent_at, self._last_verdict_at)
        self._watch = w = _Watch(round_no, start, deadline_s, check_s, start + first_check_s,
                                 end=start + deadline_s if deadline_s < ceiling_s else None)
        return w

    def _end_watch(self) -> None:
        """Forget the current wait, cancelling its check in flight."""
        if self._watch is not None and self._watch.check is not None:
            self._watch.check.future.cancel()
        self._watch = None

    def link_failed(self) -> bool:
        """Advance the link checks of the round whose verdict comes next, without blocking;
        whether they found the link dead (the next `recv_verdict` then raises LinkError unless
        the verdict turns out to be in after all)."""
        if self._stream is None or not self._sent or not self.deadline.adaptive:
            return False
        w = self._watch_of(next(iter(self._sent)))
        if w.check_s >= self.round_timeout_s:
            return False
        failed = self._poll(w, time.monotonic()) is not None
        if w.check is not None:  # the caller's next pass may hold the GIL past the check's answer
            w.check.quiet = False
        return failed

    def _await_verdict(self, round_no: int) -> cloud_pb2.VerifyResponse:
        w = self._watch_of(round_no)
        ceiling_s = self.round_timeout_s
        if w.check_s >= ceiling_s:
            self._end_watch()
            return self._recv(ceiling_s)
        if w.end is None:  # the ceiling: as before, from the call
            w.end = time.monotonic() + ceiling_s
        while True:
            now = time.monotonic()
            failure = self._poll(w, now)
            if failure is not None:
                # Judged between two drafter passes, the verdict may have come while a pass held
                # the GIL, before the reading thread could queue it: give that thread a moment.
                try:
                    response = self._recv_late(time.monotonic() + _CHECK_POLL_S)
                except _Late:
                    if failure.learnt:
                        self.deadline.missed()
                    self._end_watch()
                    raise failure from None
            else:
                until = min(w.end, w.check_at if w.check is None else now + _CHECK_POLL_S)
                try:
                    response = self._recv_late(until)
                except _Late:
                    continue
            self._end_watch()
            return response

    def _poll(self, w: _Watch, now: float) -> _Failure | None:
        """Advance `w`'s checks and deadline to `now`: what ends its wait, if anything (nothing
        while a reply is in; nothing learnt is forgotten until it is raised)."""
        if self.replies_waiting():  # a reply (or the stream's break) is in: it is read next
            if w.check is not None:
                w.check.future.cancel()
                w.check = None
            return None
        if w.dead is not None:
            return w.dead
        check = w.check
        if check is not None:
            if not check.future.done():
                return None
            w.check = None
            if answered(check.future):
                if check.quiet:  # timed only while this thread waited (see `_Check`)
                    self._observe_check(max(0.0, (check.answered_at or now) - check.t0))  # its callback may lag
            elif check.timeout_s is not None and check.wait_s >= check.timeout_s:
                w.dead = _Failure(
                    f"no reply within {1000 * (now - w.start):.0f} ms of sending round {w.round_no}, and no answer "
                    f"to a link check within {1000 * check.timeout_s:.0f} ms (the learnt check; deadline "
                    f"{1000 * w.deadline_s:.0f} ms)", SwitchCause.LATE_VERDICT, learnt=True)
                return w.dead
            w.check_at = max(w.check_at + w.check_s, now)
        if w.end is not None and now >= w.end:
            return self._late(w)
        if w.check is None and now >= w.check_at and (w.end is None or w.check_at < w.end):
            self._start_check(w, now)
        return None

    def _observe_check(self, took: float) -> None:
        """An answered link check, timed while this thread waited: the link as it is now."""
        self.deadline.observe_check(took)
        self._trip_s = took if self._trip_s is None else min(self._trip_s, took)
        self._fastest_s = took if self._fastest_s is None else min(self._fastest_s, took)

    def _late(self, w: _Watch) -> _Failure:
        ceiling_s = self.round_timeout_s
        if w.deadline_s >= ceiling_s:
            return _Failure(f"no reply within {1000 * ceiling_s:.0f} ms", SwitchCause.LATE_VERDICT)
        return _Failure(f"no reply within {1000 * w.deadline_s:.0f} ms of sending round {w.round_no} (the learnt "
                        f"deadline; ceiling {1000 * ceiling_s:.0f} ms)", SwitchCause.LATE_VERDICT, learnt=True)

    def _start_check(self, w: _Watch, now: float) -> None:
        """A link check for `w`, answered within its learnt timeout or the wait's end. Unlearnt (or
        the link not timed since the open), its silence ends nothing."""
        trip_s = self._link_trip_s()
        timeout_s = None if trip_s is None else self.deadline.check_timeout_s(trip_s)
        end = w.end if w.end is not None else w.start + self.round_timeout_s
        wait = end - now if timeout_s is None else min(timeout_s, end - now)
        if wait <= 0:
            w.check_at = end
            return
        w.check = check = _Check(self._check_call(wait), now, wait, timeout_s)
        check.future.add_done_callback(check.stamp)

    def _recv_late(self, until: float) -> cloud_pb2.VerifyResponse:
        """The next reply, or `_Late` when none came by `until` (monotonic)."""
        try:
            return self._recv(max(0.0, until - time.monotonic()))
        except LinkError as exc:
            if exc.cause != SwitchCause.LATE_VERDICT:
                raise
            raise _Late from None

    def _check_at_open(self) -> None:
        """Time the link as the stream opens, in the background (for this stream only)."""
        t0, stream = time.monotonic(), self._stream

        def answered(check: grpc.Future) -> None:  # not learnt from: it races both prefills for the CPU
            if answered(check) and stream is self._stream:
                self._opening_trip_s = time.monotonic() - t0  # one assignment: read by the waiting thread
        self._check_call(self.open_timeout_s).add_done_callback(answered)

    def _check_call(self, timeout_s: float) -> grpc.Future:
        return self._channel.unary_unary(CHECK_METHOD).future(b"", timeout=timeout_s)

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
        self._end_watch()
        if self._stream is not None:
            self._stream.close()
            self._stream = None


@dataclass(eq=False)
class _Check:
    """One link check in flight."""

    future: grpc.Future
    t0: float  # sent at (monotonic)
    wait_s: float  # gRPC's deadline for it
    timeout_s: float | None  # the learnt timeout (None: its silence ends nothing)
    # No drafter pass ran while it was out, so its answer was stamped when it came. A pass of
    # onnxruntime-genai holds the GIL, so gRPC's callback may stamp an answer only after it: such
    # a check still counts as answered (gRPC's own deadline, kept in C, decides that), but its
    # time is not learnt (it would grow the learnt check timeout by a pass, ~100-180 ms measured).
    quiet: bool = True
    answered_at: float = 0.0

    def stamp(self, _: grpc.Future) -> None:  # gRPC's thread: one assignment
        self.answered_at = time.monotonic()


@dataclass(eq=False)
class _Watch:
    """The wait for one round's verdict: its plan, its link check in flight, a dead link found."""

    round_no: int
    start: float  # when the wait began (monotonic)
    deadline_s: float
    check_s: float  # between two checks; >= the ceiling: none
    check_at: float  # the next check
    end: float | None  # when the deadline passes; None: the ceiling, counted from the first `recv_verdict`
    check: _Check | None = None
    dead: _Failure | None = None  # a check went unanswered


class _Failure(LinkError):
    """What ends a wait; `learnt`: the learnt deadline or check ended it (the samples are then
    forgotten, when it is raised)."""

    def __init__(self, message: str, cause: SwitchCause, *, learnt: bool = False) -> None:
        super().__init__(message, cause)
        self.learnt = learnt


class _Late(Exception):
    """No reply by the time asked (internal to `CloudLink._await_verdict`)."""


def _server_s(timing: cloud_pb2.ServerTiming) -> float:
    """The cloud's own time in a reply (0 from a cloud that does not report it)."""
    return max(0.0, timing.queue_ms + timing.prefill_ms + timing.verify_ms) / 1000
