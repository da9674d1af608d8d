"""A client for the CloudVerifier service: one Verify stream per session, with resume.

Guarantees:
- Every call has a deadline: opening a stream waits at most `open_timeout_s` for `opened`, and a
  round waits at most `round_timeout_s` for its verdict (the stream is cancelled otherwise).
- `verify(round)` is at-most-once per committed token: the client records the tokens of each
  verdict it receives; when a stream breaks (UNAVAILABLE, a timeout, a killed replica) it opens a
  new stream whose spec carries exactly those generated tokens and resends the same round. The
  cloud re-prefills and, since verification is keyed by position, answers as the lost stream
  would have. No committed token is lost or duplicated.
- Client errors (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) are raised as `grpc.RpcError` at once,
  never retried. `bytes_up` / `bytes_down` count serialized message bytes.
- `draft_round` encodes a drafting step for the wire: token ids, and in sampling mode each q row
  restricted to its support (the drafter samples from exactly that q, so this stays lossless).
Only grpcio, numpy and the generated protos are imported here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Self

import grpc
import numpy as np

from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED})
_END = object()


def draft_round(round_no: int, tokens: Sequence[int], q: np.ndarray | None = None) -> cloud_pb2.DraftRound:
    """A DraftRound for drafts `tokens` (k,) and, in sampling mode, their q (k, V) sent sparsely."""
    msg = cloud_pb2.DraftRound(round=round_no, draft_tokens=[int(t) for t in tokens])
    if q is not None:
        for row in np.asarray(q):
            ids = np.flatnonzero(row)
            msg.q_rows.append(common_pb2.SparseDist(ids=ids.tolist(), probs=row[ids].tolist()))
    return msg


class StreamBroken(Exception):
    """The stream failed in a way a resume may fix; `code` is the gRPC status seen."""

    def __init__(self, code: grpc.StatusCode | None, details: str | None) -> None:
        super().__init__(f"{code}: {(details or '').strip().splitlines()[0] if details else ''}")
        self.code = code


class _Stream:
    """One Verify call: a request queue, the response iterator and the call object."""

    def __init__(self, stub: cloud_pb2_grpc.CloudVerifierStub, timeout_s: float,
                 metadata: Sequence[tuple[str, str]]) -> None:
        self._requests: queue.Queue[object] = queue.Queue()
        self.call = stub.Verify(self._iterate(), timeout=timeout_s, metadata=list(metadata), wait_for_ready=True)

    def _iterate(self) -> Iterator[cloud_pb2.VerifyRequest]:
        while (item := self._requests.get()) is not _END:
            yield item  # type: ignore[misc]

    def exchange(self, request: cloud_pb2.VerifyRequest, timeout_s: float) -> cloud_pb2.VerifyResponse:
        """Send one request and wait at most timeout_s for its one response."""
        self._requests.put(request)
        timer = threading.Timer(timeout_s, self.call.cancel)
        timer.daemon = True
        timer.start()
        try:
            return next(self.call)
        except StopIteration:
            raise StreamBroken(None, "the server ended the stream without a reply") from None
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.CANCELLED and not timer.is_alive():
                raise StreamBroken(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {timeout_s}s") from None
            if code in RETRYABLE:
                raise StreamBroken(code, exc.details()) from None  # type: ignore[attr-defined]
            raise
        finally:
            timer.cancel()

    def close(self) -> None:
        self._requests.put(_END)
        self.call.cancel()


class CloudVerifierClient:
    """A speculative session against the cloud verifier, resuming on broken streams."""

    def __init__(self, target: str, *, open_timeout_s: float = 30.0, round_timeout_s: float = 10.0,
                 stream_timeout_s: float = 3600.0, max_resumes: int = 5, backoff_s: float = 0.2,
                 metadata: Sequence[tuple[str, str]] = (), channel: grpc.Channel | None = None) -> None:
        self._channel = channel or grpc.insecure_channel(target)
        self._own_channel = channel is None
        self._stub = cloud_pb2_grpc.CloudVerifierStub(self._channel)
        self.open_timeout_s, self.round_timeout_s = open_timeout_s, round_timeout_s
        self.stream_timeout_s, self.max_resumes, self.backoff_s = stream_timeout_s, max_resumes, backoff_s
        self.metadata = tuple(metadata)
        self._stream: _Stream | None = None
        self._spec: cloud_pb2.SessionSpec | None = None
        self.generated: list[int] = []  # tokens committed by verdicts so far (after the prompt)
        self.opened: cloud_pb2.SessionOpened | None = None
        self.finished = False
        self.resumes = 0
        self.bytes_up = 0
        self.bytes_down = 0

    def open(self, spec: cloud_pb2.SessionSpec) -> cloud_pb2.SessionOpened:
        """Open the session (spec.generated_tokens may already hold a resumed answer)."""
        self._spec = cloud_pb2.SessionSpec()
        self._spec.CopyFrom(spec)
        self.generated = list(spec.generated_tokens)
        self.finished = False
        return self._with_resume(lambda: self._open_stream())

    def verify(self, round_: cloud_pb2.DraftRound) -> cloud_pb2.Verdict:
        """One round; on a broken stream, resume and resend the round."""
        if self._spec is None or self.finished:
            raise RuntimeError("verify() needs an open, unfinished session")
        verdict = self._with_resume(lambda: self._round(round_))
        self.generated.extend(verdict.tokens)
        if verdict.finished:
            self.finished = True
            self._drop_stream()
        return verdict

    def close(self) -> None:
        self._drop_stream()
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, spec: cloud_pb2.SessionSpec) -> Iterator[cloud_pb2.GenerateResponse]:
        """Cloud-only generation (server stream), resumed with the tokens received on a break."""
        generated = list(spec.generated_tokens)
        attempts = 0
        while True:
            request = cloud_pb2.GenerateRequest(session=spec)
            request.session.generated_tokens[:] = generated
            self.bytes_up += request.ByteSize()
            try:
                for response in self._stub.Generate(request, timeout=self.stream_timeout_s,
                                                    metadata=list(self.metadata), wait_for_ready=True):
                    self.bytes_down += response.ByteSize()
                    generated.extend(response.tokens)
                    yield response
                    if response.finished:
                        return
                return
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempts >= self.max_resumes:  # type: ignore[attr-defined]
                    raise
                attempts += 1
                self.resumes += 1
                log.warning("Generate stream broke (%s); resuming after %d tokens", exc.code(), len(generated))  # type: ignore[attr-defined]
                time.sleep(self.backoff_s * attempts)

    # --- internals ------------------------------------------------------------------------

    def _open_stream(self) -> cloud_pb2.SessionOpened:
        assert self._spec is not None
        self._drop_stream()
        spec = cloud_pb2.SessionSpec()
        spec.CopyFrom(self._spec)
        spec.generated_tokens[:] = self.generated
        self._stream = _Stream(self._stub, self.stream_timeout_s, self.metadata)
        request = cloud_pb2.VerifyRequest(open=spec)
        self.bytes_up += request.ByteSize()
        response = self._stream.exchange(request, self.open_timeout_s)
        self.bytes_down += response.ByteSize()
        if response.WhichOneof("kind") != "opened":
            raise StreamBroken(None, "the first reply was not `opened`")
        self.opened = response.opened
        return response.opened

    def _round(self, round_: cloud_pb2.DraftRound) -> cloud_pb2.Verdict:
        if self._stream is None:
            self._open_stream()
        assert self._stream is not None
        request = cloud_pb2.VerifyRequest(round=round_)
        self.bytes_up += request.ByteSize()
        response = self._stream.exchange(request, self.round_timeout_s)
        self.bytes_down += response.ByteSize()
        if response.WhichOneof("kind") != "verdict":
            raise StreamBroken(None, "expected a verdict")
        return response.verdict

    def _with_resume(self, step):  # type: ignore[no-untyped-def]
        """Run step(); on StreamBroken reopen (with the committed tokens) and retry."""
        attempt = 0
        while True:
            try:
                return step()
            except StreamBroken as exc:
                self._drop_stream()
                if attempt >= self.max_resumes:
                    raise
                attempt += 1
                self.resumes += 1
                log.warning("cloud stream broke (%s); resume %d after %d generated tokens",
                            exc, attempt, len(self.generated))
                time.sleep(self.backoff_s * attempt)

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
