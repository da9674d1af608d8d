"""Bodies for the orchestrator's HTTP endpoint: request JSON in, OpenAI's errors, answers and
chunks out, as plain dicts.

Guarantees: pure functions over plain values, no I/O. `decode_body` returns a JSON object or
raises `ApiError(400)` (bytes that are not UTF-8, not JSON, NaN or infinities, not an object).
Every error body has OpenAI's shape `{"error": {message, type, param, code}}` (`ErrorResponse`
documents it; a test keeps the two together); answers and chunks have OpenAI's shapes plus the
`tandem` extension the caller passes in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

Kind = Literal["chat", "completion"]
JsonObj = dict[str, Any]


class ApiError(Exception):
    """An error in OpenAI's shape: HTTP status, message, type, param and code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code

    def to_json(self) -> JsonObj:
        return error_json(self.message, self.type, self.param, self.code)


def bad_request(param: str | None, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


def decode_body(raw: bytes) -> JsonObj:
    """The JSON object in a request body; ApiError(400) for anything else (NaN included)."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise bad_request(None, "the request body is not UTF-8") from None
    except (ValueError, RecursionError) as err:
        raise bad_request(None, f"the request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    return body


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error body: OpenAI's shape."""

    error: ErrorDetail


@dataclass(frozen=True)
class Envelope:
    """What every response or chunk of one request repeats."""

    kind: Kind
    id: str
    created: int  # unix seconds
    model: str


def error_json(message: str, type: str, param: str | None, code: str | None) -> JsonObj:
    """An error body; `ErrorResponse` documents this shape (a test keeps the two together)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage_json(prompt_tokens: int, completion_tokens: int) -> JsonObj:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_json(env: Envelope, text: str, finish: str, usage: JsonObj, tandem: JsonObj) -> JsonObj:
    """The whole (non-streamed) answer."""
    if env.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": env.id, "object": obj, "created": env.created, "model": env.model,
            "choices": [choice], "usage": usage, "tandem": tandem}


def chunk_json(env: Envelope, text: str | None, finish: str | None, *, role: bool = False) -> JsonObj:
    """One streamed chunk holding `text` (chat: a delta; role=True adds the assistant role)."""
    if env.kind == "chat":
        delta: JsonObj = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": env.id, "object": obj, "created": env.created, "model": env.model,
            "choices": [choice]}


def usage_chunk_json(env: Envelope, usage: JsonObj) -> JsonObj:
    """The last chunk when stream_options.include_usage is set: no choices, only usage."""
    obj = "chat.completion.chunk" if env.kind == "chat" else "text_completion"
    return {"id": env.id, "object": obj, "created": env.created, "model": env.model,
            "choices": [], "usage": usage}
