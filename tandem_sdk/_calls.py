"""What the sync and asyncio clients share; each client is a thin layer over grpc or grpc.aio.

Guarantees:
- `ClientBase` validates the constructor's arguments (a `ValueError` naming the argument, before
  any channel exists), builds the channel's options (retries: see `_retry`), its credentials
  (TLS and the API key: see `_auth`) and every request. A client subclass only opens its kind of
  channel (secure when given credentials) and runs the calls.
- Every call carries a deadline: `timeout_s` for a unary call, and for an answer its request's
  `deadline_s` plus `DEADLINE_GRACE_S`, else `generate_timeout_s`, counted from `generate()`.
  Retries happen inside that deadline. `timeout_s` and `generate_timeout_s` must be finite and
  at most `MAX_TIMEOUT_S` (one year): gRPC holds a deadline as nanoseconds since the epoch, and
  one far past that (1e10 s, inf) fails every call at once with DEADLINE_EXCEEDED.
- After `close()` every call, and every answer not started yet, raises `ClientClosed` and sends
  nothing.
- `GenerationBase` holds an answer's state: the stream opens on the first step, never when
  `cancel()` came first (that step raises `TandemError(CANCELLED)` instead), and each message
  updates `started`, `text` and `stats` in the order it arrived.
- `Unary` describes one unary call: its method, its request, and how to read the response.
- `add_document` puts a fresh idempotency key (a random UUID) into its request: gRPC's retries
  re-send the same request bytes, so every attempt of one logical call carries the same key and
  the orchestrator stores one document however many attempts reached it.
- `Pages` walks ListDocuments' pages: each page is one unary call (its own deadline and
  retries); it stops at an empty next_page_token, and raises `TandemError(INTERNAL)` rather
  than loop when a server hands back the token it was given.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from protos.tandem.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tandem_sdk import _convert, _retry
from tandem_sdk._auth import channel_security
from tandem_sdk._errors import ClientClosed, TandemError
from tandem_sdk._retry import RetryPolicy
from tandem_sdk._types import Delta, Document, Message, Result, Started, Stats, Status

T = TypeVar("T")
G = TypeVar("G")
Messages = Sequence[Message | Mapping[str, str]]
OpenStream = Callable[[float], Any]  # remaining seconds -> a started server-streaming call

# The transport deadline of a stream exceeds the answer's deadline by this much, so that a
# server that stops generating right at its deadline can still send the final stats.
DEADLINE_GRACE_S = 0.5

# The largest timeout_s or generate_timeout_s: one year. gRPC fails a call at once when its
# deadline does not fit in int64 nanoseconds since the epoch (about 7e9 s from now).
MAX_TIMEOUT_S = 365 * 24 * 3600.0


def remaining_s(deadline: float) -> float:
    """Time left before `deadline` (a `time.monotonic()` instant), never below 1 ms."""
    return max(deadline - time.monotonic(), 0.001)


def check_timeout(name: str, value: float) -> float:
    """`value` as a float when it is a number of seconds in (0, MAX_TIMEOUT_S], else ValueError
    naming `name` (inf and nan included: gRPC cannot carry them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT_S:
        raise ValueError(f"{name}: must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:.0f} (one year) "
                         f"(got {value!r})")
    return float(value)


def stream_timeout_s(deadline_s: float | None, default_s: float) -> float:
    """The transport deadline of one answer: the request's deadline plus grace, else the default."""
    return deadline_s + DEADLINE_GRACE_S if deadline_s else default_s


def cancelled_error() -> TandemError:
    """The error of a step taken on an answer that `cancel()` stopped."""
    return TandemError(grpc.StatusCode.CANCELLED, "cancelled by the client")


# --- unary calls ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unary(Generic[T]):
    """One unary call: the stub's method name, its request, and the response's conversion."""

    method: str
    request: Any
    convert: Callable[[Any], T]


def add_document(text: str, *, title: str, kind: str, privacy: str, source: str,
                 idempotency_key: str | None = None) -> Unary[Document]:
    """The AddDocument call; a fresh idempotency key unless one is given (the same key and
    document return the stored one instead of a second copy)."""
    request = _convert.add_document_request(text, title=title, kind=kind, privacy=privacy, source=source,
                                            idempotency_key=idempotency_key or uuid.uuid4().hex)
    return Unary("AddDocument", request, _convert.document)


def delete_document(doc_id: str) -> Unary[bool]:
    request = orchestrator_pb2.DeleteDocumentRequest(id=_convert.document_id(doc_id))
    return Unary("DeleteDocument", request, lambda r: bool(r.deleted))


Page = tuple[list[Document], str]  # the documents of one page, and the next page's token ("" = none)


def list_documents(page_token: str = "", page_size: int | None = None) -> Unary[Page]:
    """One page of ListDocuments."""
    return Unary("ListDocuments", _convert.list_documents_request(page_token, page_size),
                 lambda r: ([_convert.document(d) for d in r.documents], r.next_page_token))


class Pages:
    """The page requests of one listing: `first()`, then `after(page)` until it returns None."""

    def __init__(self, page_size: int | None) -> None:
        _convert.list_documents_request("", page_size)  # a bad page_size fails before any call
        self.page_size = page_size

    def first(self) -> Unary[Page]:
        return list_documents("", self.page_size)

    def after(self, sent: Unary[Page], page: Page) -> Unary[Page] | None:
        token = page[1]
        if not token:
            return None
        if token == sent.request.page_token:
            raise TandemError(grpc.StatusCode.INTERNAL, "ListDocuments returned the page token it was sent")
        return list_documents(token, self.page_size)


def set_document_privacy(doc_id: str, privacy: str) -> Unary[Document]:
    request = orchestrator_pb2.SetDocumentPrivacyRequest(
        id=_convert.document_id(doc_id), privacy=_convert.privacy_enum(privacy)
    )
    return Unary("SetDocumentPrivacy", request, _convert.document)


def status() -> Unary[Status]:
    return Unary("Status", orchestrator_pb2.StatusRequest(), _convert.status)


# --- answers -------------------------------------------------------------------------------------


@dataclass
class StreamState:
    """What an answer's messages told so far: the start, the text, the final stats."""

    started: Started | None = None
    stats: Stats | None = None
    parts: list[str] = field(default_factory=list)
    done: bool = False

    def absorb(self, message: orchestrator_pb2.GenerateTextResponse | None) -> Delta | None:
        """Record one message (None: the stream ended); the Delta when it carries text."""
        if message is None:
            self.done = True
            return None
        kind = message.WhichOneof("kind")
        if kind == "started":
            self.started = _convert.started(message.started)
        elif kind == "stats":
            self.stats = _convert.stats(message.stats)
        elif kind == "delta":
            delta = _convert.delta(message.delta)
            self.parts.append(delta.text)
            return delta
        return None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def result(self) -> Result:
        return Result(text=self.text, stats=self.stats, started=self.started)


class GenerationBase:
    """The state of one streamed answer; the sync and asyncio answers add the iteration."""

    def __init__(self, open_stream: OpenStream, deadline: float) -> None:
        self._open_stream = open_stream
        self._deadline = deadline  # a time.monotonic() instant
        self._call: Any = None
        self._cancelled = False  # set by cancel(); honoured before the first message too
        self._state = StreamState()

    @property
    def started(self) -> Started | None:
        """The first message: route, reason and citations (None until it arrived)."""
        return self._state.started

    @property
    def stats(self) -> Stats | None:
        """The final statistics (None until the stream ended)."""
        return self._state.stats

    @property
    def text(self) -> str:
        """The text so far."""
        return self._state.text

    @property
    def done(self) -> bool:
        """True once the stream ended."""
        return self._state.done

    def cancel(self) -> None:
        """Stop the answer (also before it started); a later step raises TandemError(CANCELLED)."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def _stream(self) -> Any:
        """The call, opened on the first use; CANCELLED when `cancel()` came first."""
        if self._call is None:
            if self._cancelled:
                raise cancelled_error()
            self._call = self._open_stream(remaining_s(self._deadline))
        return self._call


# --- the client ----------------------------------------------------------------------------------


class ClientBase(Generic[G]):
    """Arguments, channel and requests of a client; `G` is the type of its streamed answers."""

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
        api_key: str | None = None,
        tls: bool = False,
        ca_cert: str | os.PathLike[str] | bytes | None = None,
        server_name: str | None = None,
        insecure: bool = False,
    ) -> None:
        if not isinstance(address, str) or not address.strip():
            raise ValueError(f"address: must be 'host:port' (got {address!r})")
        self.address = _convert.text_value("address", address)
        self._closed = False  # set by close(); later calls raise ClientClosed
        self.timeout_s = check_timeout("timeout_s", timeout_s)
        self.generate_timeout_s = check_timeout("generate_timeout_s", generate_timeout_s)
        self.policy = RetryPolicy(retries=retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s)
        security = channel_security(api_key=api_key, tls=tls, ca_cert=ca_cert, server_name=server_name,
                                    address=self.address, insecure=insecure)
        self.tls = security.credentials is not None
        self._metadata = security.metadata  # the key as metadata when there is no TLS to carry it
        options = _retry.channel_options(self.policy, [*security.options, *channel_options])
        self._channel = self._connect(address, options, security.credentials)
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    def _connect(self, address: str, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
                 ) -> Any:
        """A new channel to `address` (grpc or grpc.aio), secure when `credentials` are given."""
        raise NotImplementedError

    def _answer(self, open_stream: OpenStream, deadline: float) -> G:
        """A new streamed answer (sync or asyncio) over `open_stream`."""
        raise NotImplementedError

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
    ) -> G:
        """Stream an answer to `prompt` (raw text) or `messages` (chat); the call starts on the
        answer's first step.

        route: "auto" | "local" | "speculative" | "cloud". privacy: "strict" (private context
        keeps the request on the device) | "cloud_quality" (private chunks are dropped so the
        cloud may be used). temperature 0 or None is greedy. deadline_s bounds the whole answer
        (at most 4294967.295 s, what the wire holds; 0 or None: no bound of its own, so
        generate_timeout_s applies); ttft_budget_s likewise. max_new_tokens and context_chunks 0
        or None: the server's default. Text arguments must be valid Unicode (no lone surrogates).

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
        deadline = time.monotonic() + stream_timeout_s(deadline_s, self.generate_timeout_s)

        def open_stream(remaining: float) -> Any:
            self._check_open()
            return self._stub.Generate(request, timeout=remaining, metadata=self._metadata)

        return self._answer(open_stream, deadline)

    def _start(self, op: Unary[Any]) -> Any:
        """Start `op` on the stub with the unary deadline: a response, or an awaitable of one."""
        self._check_open()
        return getattr(self._stub, op.method)(op.request, timeout=self.timeout_s, metadata=self._metadata)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed()
