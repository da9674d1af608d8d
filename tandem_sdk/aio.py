"""The asyncio Tandem client: a thin layer over `grpc.aio` on the shared `ClientBase`.

Guarantees: the same calls, arguments and guarantees as `Client`: every call carries a deadline;
gRPC retries UNAVAILABLE (backoff with jitter, bounded) for unary calls and for a stream before
its first message, never after it; failures raise `TandemError` subclasses; bad arguments raise
`ValueError` naming the argument before sending; `api_key`, `tls`, `ca_cert` and `server_name`
work as in `Client` (a missing or wrong key raises `AuthenticationError`). Create and use an `AsyncClient` inside one
running event loop. Cancelling the task that awaits an answer cancels the task as usual;
`cancel()` on the answer makes its next step raise `TandemError(CANCELLED)`.

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
from collections.abc import AsyncIterator
from typing import Any, Self, TypeVar

import grpc
import grpc.aio

from protos.tandem.v1 import orchestrator_pb2
from tandem_sdk import _calls
from tandem_sdk._calls import ClientBase, GenerationBase, OpenStream, Unary, cancelled_error
from tandem_sdk._errors import from_rpc_error
from tandem_sdk._types import Delta, Document, Result, Status

T = TypeVar("T")


class AsyncGeneration(GenerationBase):
    """One streamed answer: `async for` it for `Delta`s; the call starts on the first step.

    `started`, `stats`, `text`, `done` and `cancel()` are as in the sync `Generation`.

    Example:
        >>> gen = client.generate(prompt="Hi")
        >>> async for delta in gen:
        ...     pass
        >>> gen.stats.generated_tokens
        12
    """

    def __aiter__(self) -> AsyncGeneration:
        return self

    async def __anext__(self) -> Delta:
        while not self.done:
            delta = self._state.absorb(await self._next_message())
            if delta is not None:
                return delta
        raise StopAsyncIteration

    async def result(self) -> Result:
        """Drain what is left of the stream and return the whole answer."""
        async for _ in self:
            pass
        return self._state.result()

    async def _next_message(self) -> orchestrator_pb2.GenerateTextResponse | None:
        call = self._stream()
        try:
            message = await call.read()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError from read() after call.cancel(); only a
            # cancellation of this task itself must propagate as one.
            if call.cancelled() and not _task_cancelling():
                raise cancelled_error() from None
            raise
        return None if message is grpc.aio.EOF else message


def _task_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())


class AsyncClient(ClientBase[AsyncGeneration]):
    """A `grpc.aio` connection to the orchestrator; the arguments are those of `Client`.

    Example:
        >>> async with AsyncClient("127.0.0.1:7070", timeout_s=5) as client:
        ...     result = await client.complete(prompt="Hi", max_new_tokens=16)
        ...     docs = await client.list_documents()
        >>> async with AsyncClient("tandem.lan:7070", api_key=key, ca_cert=Path("ca.pem")) as client:
        ...     print((await client.status()).link.state)
    """

    def _connect(self, address: str, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
                 ) -> grpc.aio.Channel:
        if credentials is not None:
            return grpc.aio.secure_channel(address, credentials, options=options)
        return grpc.aio.insecure_channel(address, options=options)

    def _answer(self, open_stream: OpenStream, deadline: float) -> AsyncGeneration:
        return AsyncGeneration(open_stream, deadline)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; streams still open are cancelled, later calls raise `ClientClosed`."""
        self._closed = True
        await self._channel.close()

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Result:
        """`generate` drained: the whole text with its stats (as `Client.complete`)."""
        return await self.generate(prompt, **kwargs).result()

    async def add_document(
        self, text: str, *, title: str, kind: str = "document", privacy: str = "private", source: str = "",
        idempotency_key: str | None = None,
    ) -> Document:
        """Store a personal document on the device (as `Client.add_document`)."""
        return await self._unary(_calls.add_document(text, title=title, kind=kind, privacy=privacy, source=source,
                                                       idempotency_key=idempotency_key))

    async def delete_document(self, id: str) -> bool:
        """Delete a document; True when it existed."""
        return await self._unary(_calls.delete_document(id))

    async def list_documents(self, *, page_size: int | None = None) -> list[Document]:
        """Every stored document, oldest first (fetched page by page; see `iter_documents`)."""
        return [doc async for doc in self.iter_documents(page_size=page_size)]

    async def iter_documents(self, *, page_size: int | None = None) -> AsyncIterator[Document]:
        """Every stored document, oldest first, one ListDocuments call per page (as
        `Client.iter_documents`)."""
        pages = _calls.Pages(page_size)
        op: Unary[_calls.Page] | None = pages.first()
        while op is not None:
            page = await self._unary(op)
            for doc in page[0]:
                yield doc
            op = pages.after(op, page)

    async def set_document_privacy(self, id: str, privacy: str) -> Document:
        """Relabel a document "private" or "shareable"."""
        return await self._unary(_calls.set_document_privacy(id, privacy))

    async def status(self) -> Status:
        """Link state, circuit, RTT, recent acceptance, models and documents."""
        return await self._unary(_calls.status())

    async def _unary(self, op: Unary[T]) -> T:
        try:
            return op.convert(await self._start(op))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
