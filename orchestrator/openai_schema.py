"""OpenAI request validation and response building for the orchestrator's HTTP endpoint.

The request schema is a set of pydantic models (`ChatCompletionRequest`, `CompletionRequest`,
`ChatMessage`, `TandemOptions`...), validated in strict mode: no coercion, so a string is not a
number, a bool is not an integer and 5.0 is not an integer; NaN and infinities are refused.

Guarantees:
- `parse_request` turns a decoded `/v1/chat/completions` or `/v1/completions` body into a
  `GenerateTextRequest`, or raises `ApiError` naming the offending field (`param`, dotted path
  such as `messages[1].content` or `tandem.deadline_ms`; the message starts with it). Nothing a
  client sends makes it raise anything else. When several fields are wrong, the first one in the
  schema's order is reported (`model` first, and an unknown model is 404 "model_not_found").
- A parameter Tandem cannot honour (n > 1, tools, logprobs, penalties, JSON mode...) is refused
  with 400 rather than silently ignored; unknown fields (user, metadata...) are ignored, except
  inside the `tandem` extension, where an unknown key is refused (it is most likely a typo).
- Sampling follows OpenAI's defaults: temperature 1 when absent (0 = greedy), top_p absent = 1.
  A JSON null means the same as an absent field.
- The model id must be one of the core's; "tandem-local", "tandem-speculative" and
  "tandem-cloud" pin the route, "tandem" lets the policy decide (or `tandem.route` in the body).
- Every string the endpoint reads (message text, prompt, model, stop, `tandem.category`) must
  encode as UTF-8: a lone surrogate (JSON's "\\ud800") is refused with 400 naming the field. The
  check is `validation.text_problem`, the one the console's routes use too.
- Every string and array has a limit (`orchestrator.validation`, the same as the gRPC API's):
  at most 512 messages of at most 64 content parts, at most 4 stop sequences of at most 256
  characters, model ids of at most 64 characters, `tandem.category` at most 64 characters;
  max_tokens at most 4096, seed below 2^63, `tandem.deadline_ms` and `ttft_budget_ms` at most
  3600000, `tandem.context_chunks` at most 16. The prompt's length is the core's limit.
- The response builders live in `openai_replies` (re-exported here); `openapi_document`
  describes the endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError

from orchestrator.config import MAX_CONTEXT_CHUNKS
from orchestrator.core import MODEL_ROUTES
from orchestrator.openai_replies import (
    ApiError,
    Envelope,
    ErrorDetail,
    ErrorResponse,
    JsonObj,
    Kind,
    bad_request,
    chunk_json,
    decode_body,
    error_json,
    response_json,
    usage_chunk_json,
    usage_json,
)
from orchestrator.validation import (
    MAX_CATEGORY_CHARS,
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_MODEL_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    text_problem,
)
from protos.enums import privacy_mode_to_proto, route_to_proto
from protos.tandem.v1 import common_pb2, orchestrator_pb2
from tandem.limits import MAX_DEADLINE_MS, MAX_NEW_TOKENS
from tandem_core.routing import PrivacyMode, Route

__all__ = ["ApiError", "ChatCompletionRequest", "CompletionRequest", "Envelope", "ErrorDetail", "ErrorResponse",
           "JsonObj", "Kind", "ParsedRequest", "chunk_json", "decode_body", "error_json", "openapi_document",
           "parse_request", "response_json", "usage_chunk_json", "usage_json"]

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when the field is absent
_UINT32_MAX = (1 << 32) - 1
_SEED_MAX = (1 << 63) - 1  # the sampler's seeds are below 2^63


@dataclass(frozen=True)
class ParsedRequest:
    kind: Kind
    model: str
    stream: bool
    include_usage: bool         # stream_options.include_usage: a final usage chunk
    stop: tuple[str, ...]       # cut the text before the first of these (done here, not by the core)
    core_request: orchestrator_pb2.GenerateTextRequest


# --- the request schema ---

_STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
UInt32 = Annotated[int, Field(ge=0, le=_UINT32_MAX)]
Millis = Annotated[int, Field(ge=0, le=MAX_DEADLINE_MS)]
TokenCount = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


def _utf8(value: Any) -> Any:
    """Refuses a string protobuf cannot encode; runs before pydantic's own string checks."""
    if isinstance(value, str) and (problem := text_problem(value)) is not None:
        raise PydanticCustomError("string_unicode", problem)
    return value


Utf8 = BeforeValidator(_utf8)
Text = Annotated[str, Utf8]
StopStr = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), Utf8]


# Parameters that change the answer in ways Tandem does not implement: accepted only at the value
# that means "off".
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "best_of": lambda v: v in (None, 1),
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: v in (None, ""),
}
_OFF_ONLY = Field(None, description="Not supported by Tandem: accepted only at its 'off' value.")


def _text_parts(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "text", "text": _utf8(value)}]
    if not isinstance(value, list):
        raise PydanticCustomError("content_type", "must be a string or an array of text parts")
    return value


def _listed(value: Any) -> Any:
    if value == "":
        raise PydanticCustomError("string_too_short", "must not be empty")
    return [value] if isinstance(value, str) else value


def _single_prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise PydanticCustomError("prompt_type", "must be a string or an array of one string")
    return _utf8(value)


class TextPart(BaseModel):
    """One part of a message's content; Tandem reads text parts only."""

    model_config = _STRICT
    type: Literal["text"]
    text: Text

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise PydanticCustomError("unsupported", "only parts of type 'text' are supported")
        return data


class ChatMessage(BaseModel):
    """A chat message; "developer" is OpenAI's newer name for "system"."""

    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS), BeforeValidator(
        _text_parts, json_schema_input_type=str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)])]

    def to_proto(self) -> common_pb2.ChatMessage:
        role = "system" if self.role == "developer" else self.role
        return common_pb2.ChatMessage(role=role, content="\n".join(p.text for p in self.content))


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None


class TandemOptions(BaseModel):
    """The `tandem` extension object (the OpenAI client's `extra_body`)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    route: Literal["auto", "local", "speculative", "cloud"] | None = None
    privacy: Literal["strict", "cloud_quality"] | None = None
    use_personal_context: bool | None = None
    deadline_ms: Millis | None = None
    ttft_budget_ms: Millis | None = None
    category: Annotated[str, Field(max_length=MAX_CATEGORY_CHARS), Utf8] | None = None
    context_chunks: Annotated[int, Field(ge=0, le=MAX_CONTEXT_CHUNKS)] | None = None


class _RequestBase(BaseModel):
    """The fields `/v1/chat/completions` and `/v1/completions` share."""

    model_config = _STRICT
    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_CHARS), Utf8]
    tools: Any = _OFF_ONLY
    functions: Any = _OFF_ONLY
    tool_choice: Any = _OFF_ONLY
    function_call: Any = _OFF_ONLY
    logprobs: Any = _OFF_ONLY
    top_logprobs: Any = _OFF_ONLY
    logit_bias: Any = _OFF_ONLY
    presence_penalty: Any = _OFF_ONLY
    frequency_penalty: Any = _OFF_ONLY
    response_format: Any = _OFF_ONLY
    best_of: Any = _OFF_ONLY
    echo: Any = _OFF_ONLY
    suffix: Any = _OFF_ONLY
    n: UInt32 | None = None
    stream: bool | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=_SEED_MAX)
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    tandem: TandemOptions | None = None
    stop: Annotated[list[StopStr], Field(max_length=MAX_STOP_SEQUENCES),
                    BeforeValidator(_listed, json_schema_input_type=StopStr | Annotated[
                        list[StopStr], Field(max_length=MAX_STOP_SEQUENCES)])] | None = None
    stream_options: StreamOptions | None = None

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str, info: ValidationInfo) -> str:
        model_ids = (info.context or {}).get("model_ids")
        if model_ids is not None and model not in model_ids:
            raise PydanticCustomError(
                "model_not_found", "The model '{model}' does not exist; available: {available}",
                {"model": model, "available": ", ".join(model_ids)})
        return model

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _off(cls, value: Any, info: ValidationInfo) -> Any:
        if not _UNSUPPORTED[info.field_name or ""](value):
            raise PydanticCustomError("unsupported", "is not supported by Tandem")
        return value

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise PydanticCustomError("unsupported", "only n=1 is supported")
        return n

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_token_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        max_tokens = info.data.get("max_tokens")
        if value is not None and max_tokens is not None and value != max_tokens:
            raise PydanticCustomError("conflict", "differs from max_tokens; send one of them")
        return value


class ChatCompletionRequest(_RequestBase):
    """The body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


class CompletionRequest(_RequestBase):
    """The body of `POST /v1/completions`."""

    prompt: Annotated[str, BeforeValidator(_single_prompt, json_schema_input_type=str | Annotated[
        list[str], Field(min_length=1, max_length=1)])]


def parse_request(body: JsonObj, kind: Kind, model_ids: Sequence[str]) -> ParsedRequest:
    """Validates `body` against the schema for `kind` and builds the core's request."""
    schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        req = schema.model_validate(body, context={"model_ids": list(model_ids)})
    except ValidationError as err:
        raise api_error(err) from None
    core_request = orchestrator_pb2.GenerateTextRequest(options=_options(req))
    if isinstance(req, ChatCompletionRequest):
        core_request.messages.extend(m.to_proto() for m in req.messages)
    elif isinstance(req, CompletionRequest):
        core_request.prompt = req.prompt
    stream = bool(req.stream)
    usage = req.stream_options is not None and bool(req.stream_options.include_usage)
    return ParsedRequest(kind=kind, model=req.model, stream=stream,
                         include_usage=stream and usage, stop=tuple(req.stop or ()),
                         core_request=core_request)


def api_error(err: ValidationError) -> ApiError:
    """The first error of `err` in OpenAI's shape, `param` naming the field."""
    first = err.errors(include_url=False)[0]
    param = _param(first["loc"])
    if first["type"] == "model_not_found":
        return ApiError(404, first["msg"], param=param, code="model_not_found")
    message = "Input should be an object" if first["type"] == "model_type" else first["msg"]
    return bad_request(param, message + _got(first["type"], first.get("input")))


def _param(loc: tuple[int | str, ...]) -> str | None:
    """("messages", 0, "content") -> "messages[0].content"."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or None


def _got(kind: str, value: Any) -> str:
    """" (got 3.0)" for a short scalar value that was refused."""
    short = (isinstance(value, str) and len(value) <= 40) or isinstance(value, (bool, float)) or (
        isinstance(value, int) and abs(value) < 10**20)
    if kind in ("missing", "extra_forbidden") or not short:
        return ""
    return f" (got {json.dumps(value)})"


def _options(req: _RequestBase) -> orchestrator_pb2.GenerateOptions:
    ext = req.tandem or TandemOptions()
    return orchestrator_pb2.GenerateOptions(
        sampling=_sampling(req),
        max_new_tokens=req.max_completion_tokens or req.max_tokens or 0,
        route=_route(ext, req.model),
        privacy=privacy_mode_to_proto(PrivacyMode(ext.privacy or PrivacyMode.STRICT)),
        use_personal_context=bool(ext.use_personal_context),
        deadline_ms=ext.deadline_ms or 0,
        ttft_budget_ms=ext.ttft_budget_ms or 0,
        context_chunks=ext.context_chunks or 0,
        category=ext.category or "",
    )


def _route(ext: TandemOptions, model: str) -> int:
    pinned = MODEL_ROUTES.get(model)
    if ext.route is None:
        return route_to_proto(pinned)
    asked = None if ext.route == "auto" else Route(ext.route)
    if pinned is not None and asked != pinned:
        raise bad_request("tandem.route", f"conflicts with model '{model}', which pins its own route")
    return route_to_proto(asked)


def _sampling(req: _RequestBase) -> common_pb2.SamplingParams:
    temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    sampling = common_pb2.SamplingParams(temperature=temperature)
    if req.top_p is not None:
        sampling.top_p = req.top_p
    if req.seed is not None:
        sampling.seed = req.seed
    return sampling


# --- the OpenAPI document ---


def openapi_document() -> JsonObj:
    """An OpenAPI 3.1 document for the endpoint, its schemas generated from the models above."""
    _, defs = models_json_schema(
        [(ChatCompletionRequest, "validation"), (CompletionRequest, "validation"),
         (ErrorResponse, "serialization")], ref_template="#/components/schemas/{model}")
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}

    def post(schema: str, summary: str) -> JsonObj:
        body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": body},
                         "responses": {
                             "200": {"description": "the answer; server-sent events if stream"},
                             "400": {"description": "invalid request; param names the field",
                                     **error},
                             "404": {"description": "unknown model", **error}}}}

    listed = {"200": {"description": "the models the core serves"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tandem OpenAI-compatible API", "version": "1"},
        "paths": {"/v1/chat/completions": post("ChatCompletionRequest", "Chat completion"),
                  "/v1/completions": post("CompletionRequest", "Text completion"),
                  "/v1/models": {"get": {"summary": "List models", "responses": listed}}},
        "components": {"schemas": defs["$defs"]},
    }
