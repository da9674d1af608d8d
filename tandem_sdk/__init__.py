"""The Tandem client SDK: talk to the on-device orchestrator from an application.

Guarantees: importable with grpcio and protobuf alone (no torch, numpy, onnxruntime, ray,
transformers or aiohttp; a test proves it); importing changes nothing global. Every call has a
deadline, UNAVAILABLE is retried (by gRPC, from the channel's service config; see `_retry`) only
where that cannot repeat tokens, and failures raise `TandemError` subclasses carrying the gRPC
status (`AuthenticationError` when the orchestrator wants an API key and got none or a wrong
one; `ClientClosed` for a call after `close()`). `api_key=` sends a key on every call;
`tls=True` or `ca_cert=` (a PEM path or bytes) make the channel TLS and check the server's
certificate. Keys never appear in messages or reprs.

Example:
    >>> from tandem_sdk import Client
    >>> with Client("127.0.0.1:7070") as client:
    ...     answer = client.generate(prompt="Write a haiku about rain.", max_new_tokens=48)
    ...     for delta in answer:
    ...         print(delta.text, end="", flush=True)
    ...     print(f"\\n[{answer.stats.route}: {answer.stats.tokens_per_s:.1f} tok/s]")

An orchestrator on another machine, over TLS with an API key:
    >>> import os
    >>> with Client("tandem.lan:7070", api_key=os.environ["TANDEM_API_KEY"], ca_cert="ca.pem") as client:
    ...     print(client.status().link.state)
"""

from tandem_sdk._errors import (
    AuthenticationError,
    ClientClosed,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TandemError,
    Unavailable,
)
from tandem_sdk._types import (
    Citation,
    Delta,
    Document,
    LinkStatus,
    Message,
    ModelInfo,
    Result,
    RouteSwitch,
    Started,
    Stats,
    Status,
)
from tandem_sdk.aio import AsyncClient, AsyncGeneration
from tandem_sdk.client import Client, Generation

__all__ = [
    "AsyncClient",
    "AsyncGeneration",
    "AuthenticationError",
    "Citation",
    "Client",
    "ClientClosed",
    "DeadlineExceeded",
    "Delta",
    "Document",
    "FailedPrecondition",
    "Generation",
    "InvalidArgument",
    "LinkStatus",
    "Message",
    "ModelInfo",
    "NotFound",
    "ResourceExhausted",
    "Result",
    "RouteSwitch",
    "Started",
    "Stats",
    "Status",
    "TandemError",
    "Unavailable",
]
