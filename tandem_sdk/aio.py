"""The asyncio Tandem client, on `grpc.aio`; the same calls and guarantees as `Client`.

Guarantees: every call carries a deadline; UNAVAILABLE is retried (backoff with jitter, bounded)
for unary calls and for a stream before its first message, never after it; failures raise
`TandemError` subclasses; bad arguments raise `ValueError` naming the argument before sending.
Create and use an `AsyncClient` inside one running event loop.

Example:
    >>> import asyncio
    >>> from tandem_sdk import AsyncClient
    >>> async def main() -> None:
    ...     async with AsyncClient("127.0.0.1:7070") as client:
    ...         answer = client.generate(prompt="Reverse a list in Python.")
    ...         async for delta in answer:
    ...             print(delta.text, end="", flush=True)
    ...         print("\\n", answer.stats.route)
    >>> asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Self, TypeVar

import grpc
import grpc.aio

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
from tandem_sdk._errors import from_rpc_error
from tandem_sdk._types import Delta, Document, Message, Result, Started, Stats, Status

T = TypeVar("T")
Messages = Sequence[Message | Mapping[str, str]]


class AsyncGeneration:
    """One streamed answer: `async for` it for `Delta`s; the call starts on the first step.

    `started`, `stats` and `text` are as in the sync `Generation`.

    Example:
        >>> gen = client.generate(prompt="Hi")
        >>> async for delta in gen:
        ...     pass
        >>> gen.stats.generated_tokens
        12
    """

    def __init__(self, open_stream: Callable[[float], Any], deadline: float, policy: RetryPolicy) -> None:
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

    def __aiter__(self) -> AsyncGeneration:
        return self

    async def __anext__(self) -> Delta:
        while not self._state.done:
            message = await self._next_message()
            if message is None:
                self._state.done = True
                break
            delta = self._state.absorb(message)
            if delta is not None:
                return delta
        raise StopAsyncIteration

    async def result(self) -> Result:
        """Drain what is left of the stream and return the whole answer."""
        async for _ in self:
            pass
        return self._state.result()

    def cancel(self) -> None:
        """Stop the answer (also before it started); a later step raises TandemError(CANCELLED)."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def _read(self) -> orchestrator_pb2.GenerateTextResponse | None:
        message = await self._call.read()
        return None if message is grpc.aio.EOF else message  # type: ignore[no-any-return]

    async def _next_message(self) -> orchestrator_pb2.GenerateTextResponse | None:
        if self._cancelled and self._call is None:
            raise from_rpc_error(_Cancelled()) from None
        if self._call is None:
            return await self._first_message()
        try:
            return await self._read()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        except asyncio.CancelledError:
            if self._call.cancelled() and not self._task_cancelling():
                raise from_rpc_error(_Cancelled()) from None
            raise

    async def _first_message(self) -> orchestrator_pb2.GenerateTextResponse | None:
        while True:
            self.attempts += 1
            self._call = self._open_stream(remaining_s(self._deadline))
            try:
                return await self._read()
            except grpc.RpcError as err:
                delay = self._policy.delay_s(self.attempts, rpc_code(err), self._deadline)
                if delay is None or self._cancelled:
                    raise from_rpc_error(err) from None
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                if self._call.cancelled() and not self._task_cancelling():
                    raise from_rpc_error(_Cancelled()) from None
                raise

    @staticmethod
    def _task_cancelling() -> bool:
        task = asyncio.current_task()
        return bool(task is not None and task.cancelling())


class _Cancelled(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "the answer was cancelled"


class AsyncClient:
    """A `grpc.aio` connection to the orchestrator; the arguments are those of `Client`.

    Example:
        >>> async with AsyncClient("127.0.0.1:7070", timeout_s=5) as client:
        ...     result = await client.complete(prompt="Hi", max_new_tokens=16)
        ...     docs = await client.list_documents()
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
        self._channel = grpc.aio.insecure_channel(address, options=list(channel_options))
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; streams still open are cancelled."""
        await self._channel.close()

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
    ) -> AsyncGeneration:
        """Stream an answer; the arguments are those of `Client.generate`.

        Example:
            >>> async for delta in client.generate(messages=[{"role": "user", "content": "Hi"}]):
            ...     print(delta.text, end="")
        """
        request = _convert.generate_request(
            prompt=prompt, messages=messages, route=route, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, deadline_s=deadline_s,
            ttft_budget_s=ttft_budget_s, privacy=privacy, use_personal_context=use_personal_context,
            context_chunks=context_chunks, category=category,
        )
        deadline = time.monotonic() + stream_timeout_s(deadline_s, self.generate_timeout_s)

        def open_stream(remaining: float) -> Any:
            return self._stub.Generate(request, timeout=remaining)

        return AsyncGeneration(open_stream, deadline, self.policy)

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Result:
        """`generate` drained: the whole text with its stats."""
        return await self.generate(prompt, **kwargs).result()

    async def add_document(
        self, text: str, *, title: str, kind: str = "document", privacy: str = "private", source: str = ""
    ) -> Document:
        """Store a personal document on the device (embedded for retrieval)."""
        request = _convert.add_document_request(text, title=title, kind=kind, privacy=privacy, source=source)
        return _convert.document(await self._unary(self._stub.AddDocument, request))

    async def delete_document(self, id: str) -> bool:
        """Delete a document; True when it existed."""
        request = orchestrator_pb2.DeleteDocumentRequest(id=_convert.document_id(id))
        return bool((await self._unary(self._stub.DeleteDocument, request)).deleted)

    async def list_documents(self) -> list[Document]:
        """Every stored document."""
        response = await self._unary(self._stub.ListDocuments, orchestrator_pb2.ListDocumentsRequest())
        return [_convert.document(d) for d in response.documents]

    async def set_document_privacy(self, id: str, privacy: str) -> Document:
        """Relabel a document "private" or "shareable"."""
        request = orchestrator_pb2.SetDocumentPrivacyRequest(
            id=_convert.document_id(id), privacy=_convert.privacy_enum(privacy)
        )
        return _convert.document(await self._unary(self._stub.SetDocumentPrivacy, request))

    async def status(self) -> Status:
        """Link state, circuit, RTT, recent acceptance, models and documents."""
        return _convert.status(await self._unary(self._stub.Status, orchestrator_pb2.StatusRequest()))

    async def _unary(self, method: Callable[..., Awaitable[T]], request: object) -> T:
        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(request, timeout=remaining_s(deadline))
            except grpc.RpcError as err:
                delay = self.policy.delay_s(attempt, rpc_code(err), deadline)
                if delay is None:
                    raise from_rpc_error(err) from None
                await asyncio.sleep(delay)
