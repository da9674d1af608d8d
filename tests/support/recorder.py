"""Everything the cloud node receives, kept for privacy tests, and a search for a secret in it.

Two recorders, one at each end of the last hop:
- `CloudRecorder`, a server interceptor on the cloud node, keeps every call it is offered: the
  method and the call's metadata (even for a method the server does not implement), and every
  request message of every call type (unary, server-streaming, client-streaming, bidi), decoded
  for the cloud's raw-bytes methods.
- `LinkTap`, a TCP proxy in front of the cloud node, keeps every byte that reaches it and the
  gRPC messages reassembled from the HTTP/2 DATA frames (what a method the interceptor cannot
  read carries).

`CloudRecorder.sent_ids()` views the token ids the cloud received in a session (since the last
`clear()`), in arrival order: all of them (prompt and committed ids, every round's drafts, the
q rows' ids), the drafts alone concatenated across rounds and resumed streams, each stream's
context (prompt + committed), and the q rows position by position. `cloud_token_ids` is the
flat list. `find_secret` searches a secret's token-id sequences in every view, its text in each
view decoded whole (so a secret split across rounds or a resume still matches), in the metadata
and in the raw bytes; it returns where it was found.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from protos.tandem.v1 import cloud_pb2
from tests.support.tamper_proxy import Http2Rewriter, LoopbackProxy

# The cloud's methods that parse their own bytes (no request deserializer on the handler).
RAW_METHODS = {"/tandem.v1.CloudVerifier/Verify": cloud_pb2.VerifyRequest,
               "/tandem.v1.CloudVerifier/Generate": cloud_pb2.GenerateRequest}
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # the client's HTTP/2 connection preface


@dataclass
class Call:
    """One call the cloud node was offered."""

    method: str
    metadata: tuple[tuple[str, str | bytes], ...]
    messages: list[Any] = field(default_factory=list)  # request messages, decoded where known


@dataclass(frozen=True)
class SentIds:
    """Token ids the cloud received, in arrival order (see the module docstring)."""

    all: list[int]                    # every id: contexts, drafts, q-row ids
    drafts: list[int]                 # every round's drafts, across rounds and resumed streams
    contexts: list[list[int]]         # per opened stream or Generate call: prompt + committed ids
    q_rows: list[frozenset[int]]      # per draft position (sampling mode): the ids of its q row


class CloudRecorder(grpc.ServerInterceptor):
    """Records every call (method, metadata, request messages) the cloud node is offered."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._order: list[Any] = []  # every request message, in arrival order across calls
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()
            self._order.clear()

    @property
    def messages(self) -> list[Any]:
        """Every request message, in arrival order."""
        with self._lock:
            return list(self._order)

    def methods(self) -> list[str]:
        with self._lock:
            return [c.method for c in self.calls]

    def add(self, method: str, message: Any) -> None:
        """Record `message` as one call of `method` (for the recorder's own tests)."""
        with self._lock:
            self.calls.append(Call(method, (), [message]))
            self._order.append(message)

    def _open(self, details: grpc.HandlerCallDetails) -> Call:
        call = Call(details.method, tuple((k, v) for k, v in (details.invocation_metadata or ())))
        with self._lock:
            self.calls.append(call)
        return call

    def _keeper(self, call: Call, decoded: bool) -> Callable[[Any], None]:
        request_type = None if decoded else RAW_METHODS.get(call.method)

        def keep(message: Any) -> None:
            if not decoded:
                # A raw-bytes method the recorder cannot read would hide traffic: fail loudly.
                assert request_type is not None, f"CloudRecorder cannot decode {call.method}"
                message = request_type.FromString(message)
            with self._lock:
                call.messages.append(message)
                self._order.append(message)
        return keep

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        call = self._open(details)  # before the lookup: an unknown method's metadata is kept too
        handler = continuation(details)
        if handler is None:
            return None
        keep = self._keeper(call, handler.request_deserializer is not None)
        des, ser = handler.request_deserializer, handler.response_serializer
        if handler.stream_stream or handler.stream_unary:
            inner, make = ((handler.stream_stream, grpc.stream_stream_rpc_method_handler) if handler.stream_stream
                           else (handler.stream_unary, grpc.stream_unary_rpc_method_handler))

            def streaming(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                def recorded() -> Iterator[Any]:
                    for r in requests:
                        keep(r)
                        yield r
                return inner(recorded(), context)
            return make(streaming, des, ser)
        inner, make = ((handler.unary_stream, grpc.unary_stream_rpc_method_handler) if handler.unary_stream
                       else (handler.unary_unary, grpc.unary_unary_rpc_method_handler))

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            keep(request)
            return inner(request, context)
        return make(unary, des, ser)

    def sent_ids(self) -> SentIds:
        out = SentIds([], [], [], [])
        for m in self.messages:
            for spec in _specs(m):
                context = list(spec.prompt_tokens) + list(spec.generated_tokens)
                out.contexts.append(context)
                out.all.extend(context)
            if _is_round(m):
                out.drafts.extend(m.round.draft_tokens)
                out.all.extend(m.round.draft_tokens)
                for row in m.round.q_rows:
                    out.q_rows.append(frozenset(row.ids))
                    out.all.extend(row.ids)
        return out

    def token_lists(self) -> list[list[int]]:
        """Every token-id list of every message (contexts, committed tokens, drafts)."""
        out: list[list[int]] = []
        for m in self.messages:
            for spec in _specs(m):
                out += [list(spec.prompt_tokens), list(spec.generated_tokens)]
            if _is_round(m):
                out.append(list(m.round.draft_tokens))
        return out

    def raw(self) -> bytes:
        """The request messages serialized again (their strings included), and the metadata."""
        parts = [m.SerializeToString() if hasattr(m, "SerializeToString") else bytes(m) for m in self.messages]
        with self._lock:
            for c in self.calls:
                parts += [_as_bytes(k) + b"=" + _as_bytes(v) for k, v in c.metadata]
        return b"\n".join(parts)


def cloud_token_ids(recorder: CloudRecorder) -> list[int]:
    """Every token id the cloud received since the recorder was last cleared, in arrival order."""
    return recorder.sent_ids().all


def _specs(m: Any) -> list[Any]:
    if isinstance(m, cloud_pb2.VerifyRequest) and m.WhichOneof("kind") == "open":
        return [m.open]
    if isinstance(m, cloud_pb2.GenerateRequest):
        return [m.session]
    return []


def _is_round(m: Any) -> bool:
    return isinstance(m, cloud_pb2.VerifyRequest) and m.WhichOneof("kind") == "round"


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")


# --- the raw bytes at the link --------------------------------------------------------------


class LinkTap(LoopbackProxy):
    """A `LoopbackProxy` that keeps every byte sent upstream, and the gRPC messages in them."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self._lock = threading.Lock()
        self._bytes: list[bytearray] = []  # per connection, everything sent upstream
        self._grpc: list[bytes] = []  # whole gRPC messages from the DATA frames, in arrival order

    def __enter__(self) -> LinkTap:
        super().__enter__()
        return self

    def transforms(self, index: int) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
        with self._lock:
            self._bytes.append(bytearray())
            index = len(self._bytes) - 1
        return self._recorder(index), (lambda data: data)

    def clear(self) -> None:
        with self._lock:
            self._bytes = [bytearray() for _ in self._bytes]
            self._grpc.clear()

    def raw(self) -> bytes:
        """Every byte sent upstream since `clear()`, connection by connection."""
        with self._lock:
            return b"\n".join(bytes(b) for b in self._bytes)

    def grpc_messages(self) -> list[bytes]:
        with self._lock:
            return list(self._grpc)

    def _recorder(self, index: int) -> Callable[[bytes], bytes]:
        frames = Http2Rewriter(self._keep_message)
        preface_left = [len(_PREFACE)]  # the preface is not a frame: the parser skips it

        def forward(data: bytes) -> bytes:
            with self._lock:
                self._bytes[index] += data
            frames.feed(data[preface_left[0]:])
            preface_left[0] = max(0, preface_left[0] - len(data))
            return data
        return forward

    def _keep_message(self, message: bytes) -> bytes:
        with self._lock:
            self._grpc.append(message)
        return message


# --- the search ------------------------------------------------------------------------------


def contains(ids: Sequence[int], sub: Sequence[int]) -> bool:
    """Whether `sub` occurs contiguously in `ids`."""
    n = len(sub)
    return n > 0 and any(list(ids[i:i + n]) == list(sub) for i in range(len(ids) - n + 1))


def in_rows(rows: Sequence[frozenset[int]], sub: Sequence[int]) -> bool:
    """Whether consecutive rows hold `sub`'s ids, one per row (a secret spread over q rows)."""
    n = len(sub)
    return n > 0 and any(all(sub[j] in rows[i + j] for j in range(n)) for i in range(len(rows) - n + 1))


def secret_id_sequences(encode: Callable[[str], list[int]], secret: str) -> list[list[int]]:
    """The secret's token ids as a tokenizer may cut it: alone, after a space, and without the
    first token (which may merge with what precedes it)."""
    seqs = []
    for text in (secret, " " + secret):
        ids = encode(text)
        seqs += [ids, ids[1:]] if len(ids) > 3 else [ids]
    return [list(s) for s in {tuple(s) for s in seqs}]


def find_secret(recorder: CloudRecorder, secret: str, ids: Iterable[Sequence[int]],
                decode: Callable[[Sequence[int]], str], tap: LinkTap | None = None) -> list[str]:
    """Where the cloud saw `secret` (its text) or one of its token-id sequences `ids`: a list
    of places such as "draft ids", "q rows", "decoded context", "metadata", "link bytes"."""
    sent = recorder.sent_ids()
    id_views = {"all ids": sent.all, "draft ids": sent.drafts, **{f"context {i}": c for i, c in enumerate(sent.contexts)}}
    found = [f"{name} hold the secret's ids" for name, view in id_views.items()
             if any(contains(view, s) for s in ids)]
    if any(in_rows(sent.q_rows, s) for s in ids if len(s) >= 4):  # shorter: chance matches
        found.append("q rows hold the secret's ids")
    text_views = {"decoded drafts": sent.drafts, "decoded ids": sent.all,
                  **{f"decoded context {i}": c for i, c in enumerate(sent.contexts)}}
    found += [name for name, view in text_views.items() if view and secret in decode(view)]
    needle = secret.encode()
    if needle in recorder.raw():
        found.append("recorded messages or metadata")
    if tap is not None and needle in tap.raw():
        found.append("link bytes")
    if tap is not None and needle in b"".join(tap.grpc_messages()):  # split across messages too
        found.append("link gRPC messages")
    return found
