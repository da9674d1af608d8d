"""The synchronous Tandem client: a thin layer over `grpc` on the shared `ClientBase`.

Guarantees:
- Every call carries a deadline: `timeout_s` for document and status calls, and for `generate`
  the request's `deadline_s` (plus a short grace for the final stats) or `generate_timeout_s`.
- UNAVAILABLE is retried by gRPC itself (the channel's service config: exponential backoff with
  jitter, at most `retries` times) for unary calls and for a stream before its first message.
  After a stream's first message an error is raised, never retried (that would repeat tokens).
- Failures raise `TandemError` subclasses carrying the gRPC status; arguments the client can
  tell are wrong (a timeout that is not finite or is past one year, a number the wire cannot
  hold, a string with a lone surrogate) raise `ValueError` naming the argument before anything
  is sent. After `close()` every call raises `ClientClosed`.
- With `api_key` every call carries `authorization: Bearer KEY`; a server that wants a key and got
  none or a wrong one raises `AuthenticationError`. With `tls=True` or `ca_cert` the channel is
  TLS and the server's certificate is checked (the key then travels as call credentials); see
  `_auth` for the rules. Neither the key nor its length appears in any message or repr.

Example:
    >>> from tandem_sdk import Client
    >>> with Client("127.0.0.1:7070") as client:
    ...     answer = client.generate(prompt="Reverse a list in Python.", max_new_tokens=64)
    ...     for delta in answer:
    ...         print(delta.text, end="", flush=True)
    ...     print("\\n", answer.stats.route, answer.stats.tokens_per_s)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Self, TypeVar

import grpc

from protos.tandem.v1 import orchestrator_pb2
from tandem_sdk import _calls
from tandem_sdk._calls import ClientBase, GenerationBase, OpenStream, Unary
from tandem_sdk._errors import from_rpc_error
from tandem_sdk._types import Delta, Document, Result, Status

T = TypeVar("T")


class Generation(GenerationBase):
    """One streamed answer: iterate it for `Delta`s; the call starts on the first `next()`.

    `started` is set once the first message arrived, `stats` once the stream ended, `text` is
    the text so far. `cancel()` stops the answer early.

    Example:
        >>> gen = client.generate(prompt="Hi")
        >>> text = "".join(d.text for d in gen)
        >>> gen.started.route, gen.stats.generated_tokens, gen.text == text
        ('local', 12, True)
    """

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        while not self.done:
            delta = self._state.absorb(self._next_message())
            if delta is not None:
                return delta
        raise StopIteration

    def result(self) -> Result:
        """Drain what is left of the stream and return the whole answer."""
        for _ in self:
            pass
        return self._state.result()

    def _next_message(self) -> orchestrator_pb2.GenerateTextResponse | None:
        try:
            return next(self._stream())
        except StopIteration:
            return None
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


class Client(ClientBase[Generation]):
    """A connection to the orchestrator; close it (or use `with`) to release the channel.

    Args:
        address: "host:port" of the orchestrator's gRPC endpoint.
        timeout_s: deadline of each document or status call, retries included; > 0 and at most
            one year (`_calls.MAX_TIMEOUT_S`; gRPC cannot carry an infinite deadline).
        retries: extra attempts after UNAVAILABLE, 0 to 4 (0 disables retrying).
        generate_timeout_s: deadline of an answer that has no `deadline_s` of its own; the same
            bounds as `timeout_s`.
        backoff_s, max_backoff_s: the first retry waits up to backoff_s (> 0); each later bound is
            twice as long, at most max_backoff_s; gRPC draws each wait at random below its bound.
        channel_options: extra gRPC channel options; one with the key of a retry option
            ("grpc.service_config", "grpc.enable_retries") replaces it.
        api_key: the orchestrator's API key (read it from a file or a secret store, not from the
            source); None sends none.
        tls: use TLS and check the server's certificate against the system's root CAs.
        ca_cert: the CA that signed the server's certificate, as a path to a PEM file or PEM bytes;
            implies TLS.
        server_name: the name to check in the server's certificate when it differs from the
            address's host (gRPC's ssl_target_name_override); needs TLS.
        insecure: allow an API key without TLS to an address that is not loopback (it crosses the
            network in clear text); without it that is a ValueError.

    Example:
        >>> with Client("127.0.0.1:7070", timeout_s=5) as client:
        ...     doc = client.add_document("I live in Lyon.", title="home", kind="profile")
        ...     print(client.complete(prompt="Where do I live?", use_personal_context=True).text)

    Over TLS with an API key (an orchestrator started with --tls-cert, --tls-key, --api-key-file):
        >>> from pathlib import Path
        >>> key = Path("~/.config/tandem/api-key").expanduser().read_text().strip()
        >>> with Client("tandem.lan:7070", api_key=key, ca_cert="~/.cache/tandem/pki/ca.pem") as client:
        ...     print(client.status().link.state)
    """

    def _connect(self, address: str, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
                 ) -> grpc.Channel:
        if credentials is not None:
            return grpc.secure_channel(address, credentials, options=options)
        return grpc.insecure_channel(address, options=options)

    def _answer(self, open_stream: OpenStream, deadline: float) -> Generation:
        return Generation(open_stream, deadline)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; streams still open are cancelled, later calls raise `ClientClosed`."""
        self._closed = True
        self._channel.close()

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Result:
        """`generate` with the same arguments, drained: the whole text with its stats.

        Example:
            >>> result = client.complete(prompt="2 + 2 =", max_new_tokens=4)
            >>> result.text, result.stats.finish_reason
            (' 4', 'length')
        """
        return self.generate(prompt, **kwargs).result()

    def add_document(
        self, text: str, *, title: str, kind: str = "document", privacy: str = "private", source: str = "",
        idempotency_key: str | None = None,
    ) -> Document:
        """Store a personal document on the device (embedded for retrieval). `idempotency_key`
        (printable ASCII, at most 128 characters): the same key with the same document returns the
        document stored under it, so a retry after a timeout stores no second copy; by default
        each call gets a fresh one.

        Example:
            >>> client.add_document("Allergic to peanuts.", title="health", kind="profile").id
            'doc-1f3a'
        """
        return self._unary(_calls.add_document(text, title=title, kind=kind, privacy=privacy, source=source,
                                                       idempotency_key=idempotency_key))

    def delete_document(self, id: str) -> bool:
        """Delete a document; True when it existed."""
        return self._unary(_calls.delete_document(id))

    def list_documents(self, *, page_size: int | None = None) -> list[Document]:
        """Every stored document, oldest first (fetched page by page; see `iter_documents`)."""
        return list(self.iter_documents(page_size=page_size))

    def iter_documents(self, *, page_size: int | None = None) -> Iterator[Document]:
        """Every stored document, oldest first, one ListDocuments call per page (`page_size`
        documents at most; None = the server's default). Each page has its own deadline.

        Example:
            >>> for doc in client.iter_documents(page_size=50):
            ...     print(doc.id, doc.title)
        """
        pages = _calls.Pages(page_size)
        op: Unary[_calls.Page] | None = pages.first()
        while op is not None:
            page = self._unary(op)
            yield from page[0]
            op = pages.after(op, page)

    def set_document_privacy(self, id: str, privacy: str) -> Document:
        """Relabel a document "private" (never leaves the device) or "shareable"."""
        return self._unary(_calls.set_document_privacy(id, privacy))

    def status(self) -> Status:
        """Link state, circuit, RTT, recent acceptance, models and documents.

        Example:
            >>> s = client.status()
            >>> s.link.state, s.link.circuit, s.edge_healthy
            ('up', 'closed', True)
        """
        return self._unary(_calls.status())

    def _unary(self, op: Unary[T]) -> T:
        try:
            return op.convert(self._start(op))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
