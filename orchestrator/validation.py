"""The limits of every field of the orchestrator's API, and the checks that enforce them.

Guarantees:
- Each limit below is the one `protos/tandem/v1/orchestrator.proto` documents next to its field
  (a test keeps the two together); the OpenAI endpoint's schema uses the same constants.
- The checks raise `BadRequest` whose field is the request's field path ("title",
  "messages[3].role", "options.category", "page_token"); a client's value is quoted back at
  most `errors.SHOWN_CHARS` characters long. They run before any work is done.
- `parse_generate` turns a GenerateTextRequest into a `ParsedGenerate` or raises; nothing a
  client sends makes it raise anything else. A prompt or message with a NUL character is refused
  here, naming the field it came in (the edge's tokenizer would cut the text at it).
- `check_text` (with `text_problem`, its message) is the one check that a client's string can be
  encoded as UTF-8, as protobuf and SQLite need; the HTTP side runs it on every string it copies
  into either (JSON can carry a lone surrogate, U+D800 to U+DFFF, as "\\ud800"; gRPC cannot).
- Page tokens are opaque to clients: "" is the first page; a token is the position after the last
  document of a page, (created_unix_ms, id), so paging is stable while documents are added.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re

from orchestrator.config import MAX_CONTEXT_CHUNKS
from orchestrator.errors import BadRequest, shown
from protos.enums import privacy_mode_from_proto, route_from_proto
from protos.tandem.v1 import common_pb2
from protos.tandem.v1 import orchestrator_pb2 as opb
from tandem.limits import MAX_DEADLINE_MS, MAX_NEW_TOKENS
from tandem_core.link_health import classify_prompt
from tandem_core.sampling import SamplingParams

# Generate (the prompt's own limit is the config's `max_prompt_chars`, 200000 by default).
MAX_MESSAGES = 512
MAX_CATEGORY_CHARS = 64
ROLES = ("system", "user", "assistant")
# Documents.
MAX_TITLE_CHARS = 300
MAX_SOURCE_CHARS = 4096
MAX_DOCUMENT_BYTES = 2_000_000  # UTF-8 bytes of one document's text
MAX_ID_CHARS = 64
MAX_IDEMPOTENCY_KEY_CHARS = 128
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_PAGE_BYTES = 1 << 20  # serialized documents in one ListDocuments reply (about)
MAX_PAGE_TOKEN_CHARS = 256
# The OpenAI endpoint only.
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_CONTENT_PARTS = 64
MAX_MODEL_CHARS = 64

_KEY = re.compile(r"[\x21-\x7e]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclasses.dataclass(frozen=True)
class ParsedGenerate:
    """A GenerateTextRequest that passed every check."""

    messages: list[dict[str, str]]  # role/content, the prompt as one user message
    override: str | None  # the route the caller forces; None = the policy decides
    privacy: str  # tandem_core.routing.PrivacyMode value
    sampling: common_pb2.SamplingParams
    max_new_tokens: int  # the server default applied
    chunks: int  # personal chunks to retrieve, the server default applied
    category: str  # given, or inferred from the last user turn
    deadline_s: float | None  # the whole answer; None = none
    context_field: str  # "prompt" or "messages": the field a too-long context is blamed on


def check_length(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise BadRequest(field, f"is {len(value)} characters, the limit is {limit}")


def text_problem(value: str) -> str | None:
    """Why `value` cannot be encoded as UTF-8 (it has a lone surrogate), or None if it can."""
    found = _SURROGATE.search(value)
    if found is None:
        return None
    return f"must be valid Unicode, but character {found.start()} is a lone surrogate (U+{ord(found[0]):04X})"


def check_text(field: str, value: str) -> str:
    """`value` if protobuf and SQLite can store it; BadRequest naming `field` otherwise."""
    problem = text_problem(value)
    if problem is not None:
        raise BadRequest(field, problem)
    return value


def _check_no_nul(field: str, value: str) -> None:
    if "\x00" in value:
        raise BadRequest(field, "must not contain NUL characters")


def parse_generate(request: opb.GenerateTextRequest, *, max_prompt_chars: int, default_max_new_tokens: int,
                   default_chunks: int) -> ParsedGenerate:
    """Every check on a GenerateTextRequest (see the proto's limits), then the defaults."""
    messages = _messages(request, max_prompt_chars)
    o = request.options
    try:
        route = route_from_proto(o.route)
    except ValueError:
        raise BadRequest("options.route", f"unknown value {o.route}") from None
    try:
        privacy = privacy_mode_from_proto(o.privacy)
    except ValueError:
        raise BadRequest("options.privacy", f"unknown value {o.privacy}") from None
    _check_sampling(o.sampling)
    for name, value, limit in (("max_new_tokens", o.max_new_tokens, MAX_NEW_TOKENS),
                               ("context_chunks", o.context_chunks, MAX_CONTEXT_CHUNKS),
                               ("deadline_ms", o.deadline_ms, MAX_DEADLINE_MS),
                               ("ttft_budget_ms", o.ttft_budget_ms, MAX_DEADLINE_MS)):
        if value > limit:
            raise BadRequest(f"options.{name}", f"must be at most {limit}, got {value}")
    check_length("options.category", o.category, MAX_CATEGORY_CHARS)
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
    return ParsedGenerate(
        messages, route, privacy, o.sampling, o.max_new_tokens or default_max_new_tokens,
        o.context_chunks or default_chunks, o.category or classify_prompt(last_user),
        o.deadline_ms / 1000 if o.deadline_ms else None, "prompt" if request.prompt else "messages")


def _messages(request: opb.GenerateTextRequest, max_prompt_chars: int) -> list[dict[str, str]]:
    # Protobuf cannot tell an empty prompt from an absent one, nor an empty list from none.
    if not request.prompt and not request.messages:
        raise BadRequest("prompt", "must not be empty: give a prompt or at least one message")
    if request.prompt and request.messages:
        raise BadRequest("prompt", "give exactly one of prompt or messages")
    if len(request.messages) > MAX_MESSAGES:
        raise BadRequest("messages", f"has {len(request.messages)} messages, the limit is {MAX_MESSAGES}")
    _check_no_nul("prompt", request.prompt)
    messages = [{"role": "user", "content": request.prompt}] if request.prompt else []
    for i, m in enumerate(request.messages):
        if m.role not in ROLES:
            raise BadRequest(f"messages[{i}].role", f"must be system, user or assistant, got {shown(m.role)}")
        _check_no_nul(f"messages[{i}].content", m.content)
        messages.append({"role": m.role, "content": m.content})
    if sum(len(m["content"]) for m in messages) > max_prompt_chars:
        raise BadRequest("prompt" if request.prompt else "messages", f"longer than {max_prompt_chars} characters")
    return messages


def _check_sampling(s: common_pb2.SamplingParams) -> None:
    try:
        SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p if s.HasField("top_p") else 1.0,
                       seed=s.seed if s.HasField("seed") else None)
    except ValueError as exc:
        raise BadRequest("options.sampling", str(exc)) from None


# --- documents ---------------------------------------------------------------------------------


def check_id(field: str, value: str) -> str:
    """A document id: not empty, at most MAX_ID_CHARS characters."""
    if not value:
        raise BadRequest(field, "must not be empty")
    check_length(field, value, MAX_ID_CHARS)
    return value


def check_add(request: opb.AddDocumentRequest) -> None:
    """The AddDocument limits that do not need the store (the store checks text, kind, title). A
    document's text and title may not hold NUL: retrieved into a prompt, it would make the edge
    refuse that prompt, blaming the caller's messages."""
    for name in ("title", "text", "source"):
        _check_no_nul(name, getattr(request, name))
    check_length("title", request.title, MAX_TITLE_CHARS)
    check_length("source", request.source, MAX_SOURCE_CHARS)
    check_length("kind", request.kind, 16)
    key = request.idempotency_key
    check_length("idempotency_key", key, MAX_IDEMPOTENCY_KEY_CHARS)
    if key and not _KEY.fullmatch(key):
        raise BadRequest("idempotency_key", "must be printable ASCII without spaces (0x21-0x7e)")


def page_size(requested: int) -> int:
    """0 -> the default; above the maximum -> the maximum."""
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(created_unix_ms: int, doc_id: str) -> str:
    raw = f"{created_unix_ms}:{doc_id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_page_token(token: str) -> tuple[int, str] | None:
    """The position a page starts after; None for ""; BadRequest for a token not ours."""
    if not token:
        return None
    bad = BadRequest("page_token", "is not a next_page_token from a ListDocuments reply")
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("utf-8")
        created, doc_id = raw.split(":", 1)
        position = (int(created), doc_id)
    except (ValueError, binascii.Error):
        raise bad from None
    if not doc_id or len(doc_id) > MAX_ID_CHARS or not -(2**63) <= position[0] < 2**63:
        raise bad
    return position


def clip_text(text: str, limit: int) -> tuple[str, bool]:
    """(text cut to `limit` characters, whether it was cut)."""
    return (text, False) if len(text) <= limit else (text[:limit], True)
