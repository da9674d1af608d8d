"""The synchronous Tandem client.

Guarantees:
- Every call carries a deadline: `timeout_s` for document and status calls, and for `generate`
  the request's `deadline_s` (plus a short grace for the final stats) or `generate_timeout_s`.
- UNAVAILABLE is retried with exponential backoff and jitter, a bounded number of times, for
  unary calls and for a stream before its first message. After a stream's first message an
  error is raised, never retried (that would repeat tokens).
- Failures raise `TandemError` subclasses carrying the gRPC status; arguments the client can
  tell are wrong raise `ValueError` naming the argument before anything is sent.

Example:
    >>> from tandem_sdk import Client
    >>> with Client("127.0.0.1:7070") as client:
    ...     answer = client.generate(prompt="Reverse a list in Python.", max_new_tokens=64)
    ...     for delta in answer:
    ...         print(delta.text, end="", flush=True)
    ...     print("\\n", answer.stats.route, answer.stats.tokens_per_s)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Self, TypeVar

import grpc

from protos.tandem.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tandem_sdk import _convert
from tandem_sdk._calls import (
    RetryPolicy,
    StreamState,
    check_timeout,
    remaining_s,
    rpc_code,
    stream_timeout_s,
)
from tandem_sdk._errors import TandemError, from_rpc_error
from tandem_sdk._types import Delta, Document, Message, Result, Started, Stats, Status

T = TypeVar("T")
Messages = Sequence[Message | Mapping[str, str]]


class Generation:
    """One streamed answer: iterate it for `Delta`s; the call starts on the first `next()`.

    `started` is set once the first message arrived, `stats` once the stream ended, `text` is
    the text so far. `cancel()` stops the answer early.

    Example:
        >>> gen = client.generate(prompt="Hi")
        >>> text = "".join(d.text for d in gen)
        >>> gen.started.route, gen.stats.generated_tokens, gen.text == text
        ('local', 12, True)
    """

    def __init__(
        self,
        open_stream: Callable[[float], Any],
        deadline: float,
        policy: RetryPolicy,
    ) -> None:
        self._open_stream = open_stream
        self._deadline = deadline
        self._policy = policy
        self._call: Any = None
        self._cancelled = False  # set by cancel(); honoured before the first message too
        self._state = StreamState()
        self.attempts = 0  # stream openings so far (1 + retries)

    @property
    def started(self) -> Started | None:
        return self._state.started

    @property
    def stats(self) -> Stats | None:
        return self._state.stats

    @property
    def text(self) -> str:
        return self._state.text

    @property
    def done(self) -> bool:
        return self._state.done

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        while not self._state.done:
            message = self._next_message()
            if message is None:
                self._state.done = True
                break
            delta = self._state.absorb(message)
            if delta is not None:
                return delta
        raise StopIteration

    def result(self) -> Result:
        """Drain what is left of the stream and return the whole answer."""
        for _ in self:
            pass
        return self._state.result()

    def cancel(self) -> None:
        """Stop the answer (also before it started); a later `next()` raises TandemError(CANCELLED)."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def _next_message(self) -> orchestrator_pb2.GenerateTextResponse | None:
        if self._cancelled and self._call is None:
            raise TandemError(grpc.StatusCode.CANCELLED, "cancelled by the client")
        if self._call is None:
            return self._first_message()
        try:
            return next(self._call)
        except StopIteration:
            return None
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _first_message(self) -> orchestrator_pb2.GenerateTextResponse | None:
        while True:
            self.attempts += 1
            call = self._open_stream(remaining_s(self._deadline))
            self._call = call
            try:
                return next(call)  # type: ignore[no-any-return]
            except StopIteration:
                return None
            except grpc.RpcError as err:
                delay = self._policy.delay_s(self.attempts, rpc_code(err), self._deadline)
                if delay is None or self._cancelled:
                    raise from_rpc_error(err) from None
                time.sleep(delay)


class Client:
    """A connection to the orchestrator; close it (or use `with`) to release the channel.

    Args:
        address: "host:port" of the orchestrator's gRPC endpoint.
        timeout_s: deadline of each document or status call, retries included.
        retries: extra attempts after UNAVAILABLE (0 disables retrying).
        generate_timeout_s: deadline of an answer that has no `deadline_s` of its own.
        backoff_s, max_backoff_s: the first retry waits about backoff_s; each later one twice as
            long, at most max_backoff_s (with jitter).

    Example:
        >>> with Client("127.0.0.1:7070", timeout_s=5) as client:
        ...     doc = client.add_document("I live in Lyon.", title="home", kind="profile")
        ...     print(client.complete(prompt="Where do I live?", use_personal_context=True).text)
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        generate_timeout_s: float = 600.0,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not isinstance(address, str) or not address.strip():
            raise ValueError(f"address: must be 'host:port' (got {address!r})")
        self.address = address
        self.timeout_s = check_timeout("timeout_s", timeout_s)
        self.generate_timeout_s = check_timeout("generate_timeout_s", generate_timeout_s)
        self.policy = RetryPolicy(retries=retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s)
        self._channel = grpc.insecure_channel(address, options=list(channel_options))
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; streams still open are cancelled."""
        self._channel.close()

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
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
    ) -> Generation:
        """Stream an answer to `prompt` (raw text) or `messages` (chat); see `Generation`.

        route: "auto" | "local" | "speculative" | "cloud". privacy: "strict" (private context
        keeps the request on the device) | "cloud_quality" (private chunks are dropped so the
        cloud may be used). temperature 0 or None is greedy. deadline_s bounds the whole answer.

        Example:
            >>> for delta in client.generate(prompt="Hi", route="local", seed=1, temperature=0.7):
            ...     print(delta.text, end="")
        """
        request = _convert.generate_request(
            prompt=prompt, messages=messages, route=route, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, deadline_s=deadline_s,
            ttft_budget_s=ttft_budget_s, privacy=privacy, use_personal_context=use_personal_context,
            context_chunks=context_chunks, category=category,
        )
        timeout = stream_timeout_s(deadline_s, self.generate_timeout_s)
        deadline = time.monotonic() + timeout

        def open_stream(remaining: float) -> Any:
            return self._stub.Generate(request, timeout=remaining)

        return Generation(open_stream, deadline, self.policy)

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Result:
        """`generate` with the same arguments, drained: the whole text with its stats.

        Example:
            >>> result = client.complete(prompt="2 + 2 =", max_new_tokens=4)
            >>> result.text, result.stats.finish_reason
            (' 4', 'length')
        """
        return self.generate(prompt, **kwargs).result()

    def add_document(
        self, text: str, *, title: str, kind: str = "document", privacy: str = "private", source: str = ""
    ) -> Document:
        """Store a personal document on the device (embedded for retrieval).

        Example:
            >>> client.add_document("Allergic to peanuts.", title="health", kind="profile").id
            'doc-1f3a'
        """
        request = _convert.add_document_request(text, title=title, kind=kind, privacy=privacy, source=source)
        return _convert.document(self._unary(self._stub.AddDocument, request))

    def delete_document(self, id: str) -> bool:
        """Delete a document; True when it existed."""
        request = orchestrator_pb2.DeleteDocumentRequest(id=_convert.document_id(id))
        return bool(self._unary(self._stub.DeleteDocument, request).deleted)

    def list_documents(self) -> list[Document]:
        """Every stored document."""
        response = self._unary(self._stub.ListDocuments, orchestrator_pb2.ListDocumentsRequest())
        return [_convert.document(d) for d in response.documents]

    def set_document_privacy(self, id: str, privacy: str) -> Document:
        """Relabel a document "private" (never leaves the device) or "shareable"."""
        request = orchestrator_pb2.SetDocumentPrivacyRequest(
            id=_convert.document_id(id), privacy=_convert.privacy_enum(privacy)
        )
        return _convert.document(self._unary(self._stub.SetDocumentPrivacy, request))

    def status(self) -> Status:
        """Link state, circuit, RTT, recent acceptance, models and documents.

        Example:
            >>> s = client.status()
            >>> s.link.state, s.link.circuit, s.edge_healthy
            ('up', 'closed', True)
        """
        return _convert.status(self._unary(self._stub.Status, orchestrator_pb2.StatusRequest()))

    def _unary(self, method: Callable[..., T], request: object) -> T:
        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(request, timeout=remaining_s(deadline))
            except grpc.RpcError as err:
                delay = self.policy.delay_s(attempt, rpc_code(err), deadline)
                if delay is None:
                    raise from_rpc_error(err) from None
                time.sleep(delay)
