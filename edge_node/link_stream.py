"""The plumbing under the edge's cloud link: its errors, one Verify stream, the shared round
deadline, and cloud-only Generate.

Guarantees:
- Every wait can time out: a reader thread moves a call's replies (then its error, if any, then
  an end marker) into a queue, so a caller waits on the queue with a deadline, never on gRPC.
- A status maps to exactly one error: the retryable codes (UNAVAILABLE, DEADLINE_EXCEEDED,
  CANCELLED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNKNOWN) raise `LinkError`, resumable, with
  cause CLOUD_REFUSED for RESOURCE_EXHAUSTED and UNAVAILABLE "draining" (a replica shutting
  down) and BROKEN_STREAM otherwise; UNAUTHENTICATED and PERMISSION_DENIED (this device's token
  missing, wrong or revoked) raise `CredentialRefused`, a `LinkError` with cause CLOUD_REFUSED
  that is never resumed (a new stream would be refused the same way) but falls back to the
  device like any broken link; INVALID_ARGUMENT and the other client errors raise
  `CloudRejected`, never retried. A reply later than its deadline is LATE_VERDICT.
- Bytes are counted per direction as gRPC message bytes (serialized size plus the 5-byte length
  prefix, `GRPC_PREFIX`), so figures are comparable across runs.
- `LinkDeadline` is one `tandem_core.deadline.RoundDeadline` behind a lock, shared by the
  sessions over one link, so what one verdict teaches serves the next.
- `cloud_generate` (the cloud-only route) re-asks on a break with the tokens received, so each
  token is yielded once; gRPC never retries a stream after its first response.
- A stream's first reply (the cloud's prefill is in it, so it may take long) is awaited with
  `FirstReplyWatch`: every `OPEN_CHECK_S` a link check (a call to a method no server implements,
  `CHECK_METHOD`, which the first gRPC server on the path answers at once) goes out, one at a
  time; one unanswered within its limit (the learnt check timeout, else the round deadline)
  ends the wait with `LinkError` (LATE_VERDICT), so a link black-holed at the open falls back
  within about a second instead of at the open deadline (60 s), while a live link whose cloud
  prefills a long prompt keeps waiting. Its `cancelled` ends the wait with `RequestCancelled`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc, common_pb2
from tandem_core.deadline import DeadlinePolicy, RoundDeadline
from tandem_core.link_health import backoff_delay
from tandem_core.loop import SwitchCause, VerifierUnavailable
from tandem_core.sampling import SamplingParams

log = logging.getLogger(__name__)

_END = object()
GRPC_PREFIX = 5  # gRPC length-prefixed message framing
CHECK_METHOD = "/tandem.v1.LinkCheck/Ping"  # implemented nowhere: any status but these two is an answer
CHECK_DEAD = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
OPEN_CHECK_S = 0.1  # while a stream's first reply is awaited, the link is checked this often
OPEN_POLL_S = 0.02  # and the reply looked for this often
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


class RequestCancelled(Exception):
    """The request was cancelled (its consumer left) while it waited for the cloud."""


def answered(check: grpc.Future) -> bool:
    """Whether a link check came back over the link (UNIMPLEMENTED, or any status but no answer)."""
    error = check.exception()
    return not (isinstance(error, grpc.RpcError) and error.code() in CHECK_DEAD)


class FirstReplyWatch:
    """Link checks while a stream's first reply is awaited (see the module doc)."""

    def __init__(self, channel: grpc.Channel, limit_s: float, cancelled: Callable[[], bool] | None = None,
                 on_answer: Callable[[float], None] | None = None) -> None:
        """`on_answer(seconds)`: each answered check's round trip (stamped on gRPC's thread)."""
        self._channel, self._limit_s, self._cancelled, self._on_answer = channel, limit_s, cancelled, on_answer
        self._start = time.monotonic()
        self._next = self._start + OPEN_CHECK_S
        self._check: grpc.Future | None = None
        self._sent_at = 0.0
        self._answered: tuple[grpc.Future | None, float] = (None, 0.0)  # (check, when its answer came)

    def poll(self) -> None:
        """Raise RequestCancelled, or LinkError once a check went unanswered; else start the next
        check when it is due."""
        if self._cancelled is not None and self._cancelled():
            raise RequestCancelled("cancelled while the cloud session opened")
        now, check = time.monotonic(), self._check
        if check is not None and check.done():
            self._check = None
            if not answered(check):
                raise LinkError(f"no reply to the open within {1000 * (now - self._start):.0f} ms, and no answer "
                                f"to a link check within {1000 * self._limit_s:.0f} ms", SwitchCause.LATE_VERDICT)
            if self._on_answer is not None:
                stamped, at = self._answered
                self._on_answer(max(0.0, (at if stamped is check else now) - self._sent_at))
            self._next = now + OPEN_CHECK_S
        if self._check is None and now >= self._next:
            self._sent_at = now
            self._check = self._channel.unary_unary(CHECK_METHOD).future(b"", timeout=self._limit_s)
            self._check.add_done_callback(self._stamp)

    def _stamp(self, check: grpc.Future) -> None:  # gRPC's thread: one assignment
        self._answered = (check, time.monotonic())

    def close(self) -> None:
        if self._check is not None:
            self._check.cancel()
            self._check = None


class CredentialRefused(LinkError):
    """The cloud refused this device's credential (UNAUTHENTICATED: none or a wrong token;
    PERMISSION_DENIED: revoked): not resumable, but the answer may go on on the device."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"the cloud refused this device's token ({code.name}): {details}", SwitchCause.CLOUD_REFUSED)
        self.code = code


class CloudRejected(Exception):
    """The cloud refused the request (bad input): not resumable."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"cloud rejected the request ({code.name}): {message}")
        self.code = code
        self.details = message  # the cloud's one-line status message (`cloud_node.status`)


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


def link_error(err: grpc.RpcError) -> Exception:
    """A broken stream is resumable (LinkError); a refusal is not (CloudRejected)."""
    code, details = err.code(), err.details() or ""
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return CredentialRefused(code, details)
    if code in _RETRYABLE:
        refused = code == grpc.StatusCode.RESOURCE_EXHAUSTED or (
            code == grpc.StatusCode.UNAVAILABLE and details.startswith("draining"))
        return LinkError(f"stream broke: {code.name} {details}",
                         SwitchCause.CLOUD_REFUSED if refused else SwitchCause.BROKEN_STREAM)
    return CloudRejected(code, details)


SEND_WAIT_S = 0.02  # how long `send` waits, at most, for gRPC to have written the request


class VerifyStream:
    """One Verify call: requests fed from a queue, responses read by a thread into a queue.

    `send` returns once gRPC's sending thread has written the request (or after `SEND_WAIT_S`;
    at once when the call has ended).
    That thread needs the GIL, and the drafter's passes (onnxruntime-genai) hold it for their
    whole length: a request put in the queue just before a pass went out only after it. Measured
    on the open, whose drafter prefill pass starts right after: +50 ms to the first token."""

    def __init__(self, stub: cloud_pb2_grpc.CloudVerifierStub, total_timeout_s: float) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self._written = threading.Condition()
        self._sent = self._put = 0  # requests written by gRPC; requests put in the queue
        self._call = stub.Verify(self._feed(), timeout=total_timeout_s)
        self._reader = _start_reader(self._call, self._responses)

    def _feed(self) -> Iterator[cloud_pb2.VerifyRequest]:
        """The call's requests. gRPC asks for the next one only once it has written the last."""
        while (item := self._requests.get()) is not _END:
            yield item
            with self._written:
                self._sent += 1
                self._written.notify_all()

    def send(self, request: cloud_pb2.VerifyRequest) -> None:
        with self._written:
            self._put += 1
            mine = self._put
            self._requests.put(request)
            if not self._call.done():  # an ended call writes nothing: no wait
                self._written.wait_for(lambda: self._sent >= mine, SEND_WAIT_S)

    def recv(self, timeout_s: float) -> cloud_pb2.VerifyResponse:
        try:
            item = self._responses.get(timeout=timeout_s)
        except queue.Empty:
            raise LinkError(f"no reply within {timeout_s * 1000:.0f} ms", SwitchCause.LATE_VERDICT) from None
        if isinstance(item, grpc.RpcError):
            raise link_error(item)
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
            return deadline_s, d.first_check_s(deadline_s), d.check_after_s(deadline_s)

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


def cloud_generate(channel: grpc.Channel, prompt_ids: Sequence[int], params: SamplingParams, seed: int,
                   max_new_tokens: int, *, timeout_s: float = 3600.0, first_timeout_s: float | None = None,
                   gap_timeout_s: float | None = None, max_resumes: int = 3, backoff_s: float = 0.2,
                   counter: dict[str, int] | None = None, check_limit_s: float | None = None,
                   cancelled: Callable[[], bool] | None = None) -> Iterator[cloud_pb2.GenerateResponse]:
    """Cloud-only generation over a server stream; on a break it re-asks with the tokens received.

    Each response is yielded once; `counter` (if given) accumulates "up"/"down" message bytes
    and counts "resumes".
    The first reply (prefill included) must come within `first_timeout_s` and each later one
    within `gap_timeout_s` of the previous (None = no limit), else the stream counts as broken.
    With `check_limit_s`, the first reply is awaited with a `FirstReplyWatch` (that limit,
    `cancelled`).
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
        counter["up"] = counter.get("up", 0) + request.ByteSize() + GRPC_PREFIX
        try:
            call = stub.Generate(request, timeout=timeout_s)
            watch = None if check_limit_s is None else FirstReplyWatch(channel, check_limit_s, cancelled)
            for response in _with_deadlines(call, first_timeout_s, gap_timeout_s, watch):
                counter["down"] = counter.get("down", 0) + response.ByteSize() + GRPC_PREFIX
                generated.extend(response.tokens)
                yield response
                if response.finished:
                    return
            raise LinkError("the stream ended before the answer finished")
        except LinkError as exc:
            if isinstance(exc, CredentialRefused):
                raise
            if resumes >= max_resumes:
                raise LinkError(f"cloud unreachable after {resumes} resumes: {exc}", exc.cause) from None
            time.sleep(backoff_delay(resumes, backoff_s))
            resumes += 1
            counter["resumes"] = resumes
            log.info("cloud Generate stream broke (%s); resuming after %d tokens", exc, len(generated))


def _with_deadlines(call: Iterator[cloud_pb2.GenerateResponse], first_timeout_s: float | None,
                    gap_timeout_s: float | None, watch: FirstReplyWatch | None = None
                    ) -> Iterator[cloud_pb2.GenerateResponse]:
    """Yield a server stream's replies, raising LinkError when one is later than its deadline
    (the first one's wait also ends by `watch`, when given).

    A reader thread feeds a queue so the wait can time out; the call is cancelled on any exit.
    """
    replies: queue.Queue = queue.Queue()
    _start_reader(call, replies)
    timeout, first = first_timeout_s, True
    try:
        while True:
            try:
                item = _first_reply(replies, timeout, watch) if first and watch is not None else \
                    replies.get(timeout=timeout)
            except queue.Empty:
                raise LinkError(f"no reply within {timeout * 1000:.0f} ms",  # type: ignore[operator]
                                SwitchCause.LATE_VERDICT) from None
            if item is _END:
                return
            if isinstance(item, grpc.RpcError):
                raise link_error(item)
            if first:
                first, timeout = False, gap_timeout_s
            yield item
    finally:
        if watch is not None:
            watch.close()
        call.cancel()  # type: ignore[attr-defined]


def _first_reply(replies: queue.Queue, timeout_s: float | None, watch: FirstReplyWatch) -> Any:
    """The next item of `replies` within `timeout_s` (queue.Empty after it), while `watch` checks
    the link (its LinkError or RequestCancelled ends the wait, unless the reply is in by then)."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        wait = OPEN_POLL_S if end is None else min(OPEN_POLL_S, end - time.monotonic())
        if wait <= 0:
            raise queue.Empty
        try:
            return replies.get(timeout=wait)
        except queue.Empty:
            pass
        try:
            watch.poll()
        except (LinkError, RequestCancelled) as exc:
            try:  # it may have come while the check was judged
                return replies.get(timeout=OPEN_POLL_S)
            except queue.Empty:
                raise exc from None
