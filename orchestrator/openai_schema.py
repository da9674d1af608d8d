"""OpenAI request validation and response building for the orchestrator's HTTP endpoint.

Guarantees:
- `parse_request` turns a decoded `/v1/chat/completions` or `/v1/completions` body into a
  `GenerateTextRequest`, or raises `ApiError` naming the offending field (`param`, dotted path
  such as `messages[1].content` or `tandem.deadline_ms`). Nothing a client sends makes it raise
  anything else.
- A parameter Tandem cannot honour (n > 1, tools, logprobs, penalties, JSON mode...) is refused
  with 400 rather than silently ignored; fields with no effect on the text (user, metadata...)
  are ignored.
- Sampling follows OpenAI's defaults: temperature 1 when absent (0 = greedy), top_p absent = 1.
- The model id must be one of the core's; "tandem-local", "tandem-speculative" and
  "tandem-cloud" pin the route, "tandem" lets the policy decide (or `tandem.route` in the body).
- The builders return plain dicts in OpenAI's response and chunk shapes, plus the `tandem`
  extension holding the orchestrator's statistics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from protos.tandem.v1 import common_pb2, orchestrator_pb2

Kind = Literal["chat", "completion"]
JsonObj = dict[str, Any]
_E = TypeVar("_E")  # a proto enum

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when the field is absent
MAX_STOP_SEQUENCES = 4
_UINT32_MAX = (1 << 32) - 1
_UINT64_MAX = (1 << 64) - 1

MODEL_ROUTES: dict[str, orchestrator_pb2.Route] = {
    "tandem": orchestrator_pb2.ROUTE_AUTO,
    "tandem-local": orchestrator_pb2.ROUTE_LOCAL,
    "tandem-speculative": orchestrator_pb2.ROUTE_SPECULATIVE,
    "tandem-cloud": orchestrator_pb2.ROUTE_CLOUD,
}
_ROUTES = {
    "auto": orchestrator_pb2.ROUTE_AUTO,
    "local": orchestrator_pb2.ROUTE_LOCAL,
    "speculative": orchestrator_pb2.ROUTE_SPECULATIVE,
    "cloud": orchestrator_pb2.ROUTE_CLOUD,
}
_PRIVACY_MODES = {
    "strict": orchestrator_pb2.PRIVACY_MODE_STRICT,
    "cloud_quality": orchestrator_pb2.PRIVACY_MODE_CLOUD_QUALITY,
}
_TANDEM_KEYS = (
    "route", "privacy", "use_personal_context", "deadline_ms", "ttft_budget_ms", "category",
    "context_chunks",
)
_ROLES = ("system", "user", "assistant")

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


def _bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


@dataclass(frozen=True)
class ParsedRequest:
    kind: Kind
    model: str
    stream: bool
    include_usage: bool         # stream_options.include_usage: a final usage chunk
    stop: tuple[str, ...]       # cut the text before the first of these (done here, not by the core)
    core_request: orchestrator_pb2.GenerateTextRequest


def decode_body(raw: bytes) -> JsonObj:
    """The JSON object in a request body; ApiError(400) for anything else (NaN included)."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise _bad(None, "the request body is not UTF-8") from None
    except (ValueError, RecursionError) as err:
        raise _bad(None, f"the request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise _bad(None, f"the request body must be a JSON object, not {_json_type(body)}")
    return body


def parse_request(body: JsonObj, kind: Kind, model_ids: list[str]) -> ParsedRequest:
    model = _model(body, model_ids)
    for name, is_off in _UNSUPPORTED.items():
        if not is_off(body.get(name)):
            raise _bad(name, "is not supported by Tandem")
    n = _opt_int(body, "n", 0, _UINT32_MAX)
    if n is not None and n != 1:
        raise _bad("n", f"only n=1 is supported (got {n})")
    stream = bool(_opt_bool(body, "stream"))
    request = orchestrator_pb2.GenerateTextRequest(options=_options(body, model))
    if kind == "chat":
        request.messages.extend(_messages(body.get("messages")))
    else:
        request.prompt = _prompt(body.get("prompt"))
    return ParsedRequest(
        kind=kind,
        model=model,
        stream=stream,
        include_usage=stream and _include_usage(body.get("stream_options")),
        stop=_stop(body.get("stop")),
        core_request=request,
    )


def _model(body: JsonObj, model_ids: list[str]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "is required and must be a string")
    if model not in model_ids:
        raise ApiError(
            404,
            f"The model '{model}' does not exist; available: {', '.join(model_ids)}",
            param="model",
            code="model_not_found",
        )
    return model


def _options(body: JsonObj, model: str) -> orchestrator_pb2.GenerateOptions:
    options = orchestrator_pb2.GenerateOptions(sampling=_sampling(body))
    max_tokens = _opt_int(body, "max_tokens", 1, _UINT32_MAX)
    max_completion = _opt_int(body, "max_completion_tokens", 1, _UINT32_MAX)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise _bad("max_completion_tokens", "differs from max_tokens; send one of them")
    options.max_new_tokens = max_completion or max_tokens or 0
    ext = body.get("tandem")
    if ext is None:
        ext = {}
    if not isinstance(ext, dict):
        raise _bad("tandem", f"must be an object, not {_json_type(ext)}")
    for key in ext:
        if key not in _TANDEM_KEYS:
            raise _bad(f"tandem.{key}", f"unknown option; known: {', '.join(_TANDEM_KEYS)}")
    options.route = _route(ext, model)
    privacy = _opt_choice(ext, "privacy", _PRIVACY_MODES, "tandem.")
    options.privacy = privacy if privacy is not None else orchestrator_pb2.PRIVACY_MODE_STRICT
    options.use_personal_context = bool(_opt_bool(ext, "use_personal_context", "tandem."))
    options.deadline_ms = _opt_int(ext, "deadline_ms", 0, _UINT32_MAX, "tandem.") or 0
    options.ttft_budget_ms = _opt_int(ext, "ttft_budget_ms", 0, _UINT32_MAX, "tandem.") or 0
    options.context_chunks = _opt_int(ext, "context_chunks", 0, _UINT32_MAX, "tandem.") or 0
    options.category = _opt_str(ext, "category", "tandem.") or ""
    return options


def _route(ext: JsonObj, model: str) -> orchestrator_pb2.Route:
    pinned = MODEL_ROUTES.get(model, orchestrator_pb2.ROUTE_AUTO)
    asked = _opt_choice(ext, "route", _ROUTES, "tandem.")
    if asked is None:
        return pinned
    if pinned != orchestrator_pb2.ROUTE_AUTO and asked != pinned:
        raise _bad("tandem.route", f"conflicts with model '{model}', which pins its own route")
    return asked


def _sampling(body: JsonObj) -> common_pb2.SamplingParams:
    temperature = _opt_number(body, "temperature", 0.0, 2.0)
    sampling = common_pb2.SamplingParams(
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature
    )
    top_p = _opt_number(body, "top_p", 0.0, 1.0)
    if top_p is not None:
        if top_p <= 0.0:
            raise _bad("top_p", "must be in (0, 1]")
        sampling.top_p = top_p
    seed = _opt_int(body, "seed", 0, _UINT64_MAX)
    if seed is not None:
        sampling.seed = seed
    return sampling


def _messages(value: Any) -> list[common_pb2.ChatMessage]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", "is required and must be a non-empty array")
    out = []
    for i, message in enumerate(value):
        path = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(path, f"must be an object, not {_json_type(message)}")
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in _ROLES:
            raise _bad(f"{path}.role", f"must be one of {', '.join(_ROLES)} (got {role!r})")
        content = _content_text(message.get("content"), f"{path}.content")
        out.append(common_pb2.ChatMessage(role=role, content=content))
    return out


def _content_text(content: Any, path: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(path, "must be a string or an array of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise _bad(f"{path}[{j}]", "only parts of type 'text' are supported")
        if not isinstance(part.get("text"), str):
            raise _bad(f"{path}[{j}].text", "must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise _bad("prompt", "must be a string or an array of one string")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", "must be a non-empty string or an array of non-empty strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise _bad("stop", f"at most {MAX_STOP_SEQUENCES} sequences")
    return tuple(stops)


def _include_usage(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise _bad("stream_options", f"must be an object, not {_json_type(value)}")
    return bool(_opt_bool(value, "include_usage", "stream_options."))


# --- typed field readers: None when absent or null, ApiError(400) when of the wrong type ---


def _opt_int(obj: JsonObj, key: str, lo: int, hi: int, prefix: str = "") -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(prefix + key, f"must be an integer, not {_json_type(value)}")
    if not lo <= value <= hi:
        raise _bad(prefix + key, f"must be in [{lo}, {hi}] (got {value})")
    return value


def _opt_number(obj: JsonObj, key: str, lo: float, hi: float) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, f"must be a number, not {_json_type(value)}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise _bad(key, f"must be in [{lo:g}, {hi:g}] (got {value})")
    return float(value)


def _opt_bool(obj: JsonObj, key: str, prefix: str = "") -> bool | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, bool):
        raise _bad(prefix + key, f"must be a boolean, not {_json_type(value)}")
    return value


def _opt_str(obj: JsonObj, key: str, prefix: str = "") -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _bad(prefix + key, f"must be a string, not {_json_type(value)}")
    return value


def _opt_choice(obj: JsonObj, key: str, choices: Mapping[str, _E], prefix: str) -> _E | None:
    value = _opt_str(obj, key, prefix)
    if value is None:
        return None
    if value not in choices:
        raise _bad(prefix + key, f"must be one of {', '.join(choices)} (got {value!r})")
    return choices[value]


def _json_type(value: Any) -> str:
    for py, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                     (list, "array"), (dict, "object")):
        if isinstance(value, py):
            return name
    return "null" if value is None else type(value).__name__


# --- responses ---


@dataclass(frozen=True)
class Envelope:
    """What every response or chunk of one request repeats."""

    kind: Kind
    id: str
    created: int  # unix seconds
    model: str


def error_json(message: str, type: str, param: str | None, code: str | None) -> JsonObj:
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
