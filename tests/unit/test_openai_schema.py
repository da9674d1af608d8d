"""The OpenAI request schema (`orchestrator.openai_schema`), without a server.

Every refusal must be an `ApiError` with status 400, type "invalid_request_error", code None,
and `param` naming the field in the endpoint's format (`messages[0].content[1].text`); the
message starts with that param. Accepted bodies must reach the core's request unchanged.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.config import MAX_CONTEXT_CHUNKS
from orchestrator.openai_schema import (
    ApiError,
    ChatCompletionRequest,
    ErrorResponse,
    decode_body,
    error_json,
    openapi_document,
    parse_request,
)
from orchestrator.validation import MAX_CONTENT_PARTS, MAX_MESSAGES, MAX_STOP_CHARS
from protos.tandem.v1 import orchestrator_pb2
from tandem.limits import MAX_DEADLINE_MS, MAX_NEW_TOKENS

MODELS = ["tandem", "tandem-local", "tandem-speculative", "tandem-cloud"]
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
SEED_MAX = (1 << 63) - 1


def _chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tandem", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return body


def _tandem(**options: Any) -> dict[str, Any]:
    return _chat(tandem=options)


def _refused(body: dict[str, Any], kind: str = "chat") -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_request(body, kind, MODELS)  # type: ignore[arg-type]
    return info.value


def _assert_400(body: dict[str, Any], param: str | None, kind: str = "chat") -> ApiError:
    err = _refused(body, kind)
    assert (err.status, err.param, err.type, err.code) == (400, param, "invalid_request_error", None)
    if param is not None:
        assert err.message.startswith(f"{param}: "), err.message
    assert err.to_json() == {"error": {"message": err.message, "type": "invalid_request_error",
                                       "param": param, "code": None}}
    assert ErrorResponse.model_validate(err.to_json()).model_dump() == err.to_json()
    return err


WRONG_TYPES = [
    (_chat(model=5), "model"),
    (_chat(temperature="1"), "temperature"),
    (_chat(temperature=True), "temperature"),
    (_chat(top_p=[0.5]), "top_p"),
    (_chat(max_tokens=1.5), "max_tokens"),
    (_chat(max_tokens=8.0), "max_tokens"),
    (_chat(max_tokens=True), "max_tokens"),
    (_chat(max_completion_tokens="8"), "max_completion_tokens"),
    (_chat(seed=1.0), "seed"),
    (_chat(n=True), "n"),
    (_chat(stream="yes"), "stream"),
    (_chat(stream=1), "stream"),
    (_chat(stream_options=True), "stream_options"),
    (_chat(stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (_chat(stop=5), "stop"),
    (_chat(stop=["a", 3]), "stop[1]"),
    (_chat(messages="hi"), "messages"),
    (_chat(messages=None), "messages"),
    (_chat(messages=[{"role": "user", "content": "a"}, "b"]), "messages[1]"),
    (_chat(messages=[{"role": 3, "content": "a"}]), "messages[0].role"),
    (_chat(messages=[{"role": "tool", "content": "a"}]), "messages[0].role"),
    (_chat(messages=[{"content": "a"}]), "messages[0].role"),
    (_chat(messages=[{"role": "user"}]), "messages[0].content"),
    (_chat(messages=[{"role": "user", "content": 3}]), "messages[0].content"),
    (_chat(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    (_chat(messages=[{"role": "user", "content": ["a"]}]), "messages[0].content[0]"),
    (_chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "image_url"}]}]),
     "messages[0].content[1]"),
    (_chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
     "messages[0].content[0].text"),
    (_chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
     "messages[0].content[0].text"),
    (_chat(tandem=[]), "tandem"),
    (_chat(tandem="cloud"), "tandem"),
    (_tandem(route=1), "tandem.route"),
    (_tandem(route="edge"), "tandem.route"),
    (_tandem(privacy="public"), "tandem.privacy"),
    (_tandem(use_personal_context=1), "tandem.use_personal_context"),
    (_tandem(deadline_ms="5000"), "tandem.deadline_ms"),
    (_tandem(deadline_ms=True), "tandem.deadline_ms"),
    (_tandem(ttft_budget_ms=1.5), "tandem.ttft_budget_ms"),
    (_tandem(context_chunks=[]), "tandem.context_chunks"),
    (_tandem(category=3), "tandem.category"),
]


@pytest.mark.parametrize(("body", "param"), WRONG_TYPES)
def test_wrong_types_are_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    _assert_400(body, param)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_nan_and_infinities_are_refused(field: str, value: float) -> None:
    err = _assert_400(_chat(**{field: value}), field)
    assert "finite" in err.message


@pytest.mark.parametrize(("body", "param"), [
    (_chat(temperature=-0.1), "temperature"),
    (_chat(temperature=2.01), "temperature"),
    (_chat(temperature=10 ** 400), "temperature"),
    (_chat(top_p=0.0), "top_p"),
    (_chat(top_p=1.5), "top_p"),
    (_chat(max_tokens=0), "max_tokens"),
    (_chat(max_tokens=UINT32_MAX + 1), "max_tokens"),
    (_chat(max_completion_tokens=0), "max_completion_tokens"),
    (_chat(max_tokens=8, max_completion_tokens=9), "max_completion_tokens"),
    (_chat(seed=-1), "seed"),
    (_chat(seed=UINT64_MAX + 1), "seed"),
    (_chat(seed=SEED_MAX + 1), "seed"),
    (_chat(max_tokens=MAX_NEW_TOKENS + 1), "max_tokens"),
    (_chat(max_completion_tokens=MAX_NEW_TOKENS + 1), "max_completion_tokens"),
    (_tandem(deadline_ms=MAX_DEADLINE_MS + 1), "tandem.deadline_ms"),
    (_tandem(context_chunks=MAX_CONTEXT_CHUNKS + 1), "tandem.context_chunks"),
    (_tandem(category="c" * 65), "tandem.category"),
    (_chat(model="m" * 65), "model"),
    (_chat(n=0), "n"),
    (_chat(n=2), "n"),
    (_chat(n=UINT32_MAX + 1), "n"),
    (_tandem(deadline_ms=-1), "tandem.deadline_ms"),
    (_tandem(ttft_budget_ms=UINT32_MAX + 1), "tandem.ttft_budget_ms"),
    (_tandem(context_chunks=-3), "tandem.context_chunks"),
])
def test_out_of_range_values_are_refused(body: dict[str, Any], param: str) -> None:
    _assert_400(body, param)


def test_range_boundaries_are_accepted() -> None:
    parsed = parse_request(_chat(temperature=2, top_p=1, seed=SEED_MAX, n=1,
                                 max_tokens=MAX_NEW_TOKENS, max_completion_tokens=MAX_NEW_TOKENS,
                                 tandem={"deadline_ms": 0, "ttft_budget_ms": MAX_DEADLINE_MS,
                                         "context_chunks": MAX_CONTEXT_CHUNKS, "category": "c" * 64}),
                           "chat", MODELS)
    opts = parsed.core_request.options
    assert opts.sampling.temperature == 2.0 and opts.sampling.top_p == 1.0
    assert opts.sampling.seed == SEED_MAX and opts.max_new_tokens == MAX_NEW_TOKENS
    assert opts.deadline_ms == 0 and opts.context_chunks == MAX_CONTEXT_CHUNKS
    assert opts.ttft_budget_ms == MAX_DEADLINE_MS
    greedy = parse_request(_chat(temperature=0), "chat", MODELS).core_request.options.sampling
    assert greedy.temperature == 0.0


@pytest.mark.parametrize(("body", "param", "kind"), [
    (_chat(model=""), "model", "chat"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model", "chat"),
    (_chat(messages=[]), "messages", "chat"),
    ({"model": "tandem"}, "messages", "chat"),
    (_chat(stop=""), "stop", "chat"),
    (_chat(stop=["a", ""]), "stop[1]", "chat"),
    ({"model": "tandem"}, "prompt", "completion"),
    ({"model": "tandem", "prompt": []}, "prompt", "completion"),
    ({"model": "tandem", "prompt": None}, "prompt", "completion"),
    ({"model": "tandem", "prompt": ["a", "b"]}, "prompt", "completion"),
    ({"model": "tandem", "prompt": [3]}, "prompt", "completion"),
])
def test_missing_or_empty_fields_are_refused(body: dict[str, Any], param: str, kind: str) -> None:
    _assert_400(body, param, kind)


def test_empty_text_is_accepted() -> None:
    assert parse_request({"model": "tandem", "prompt": ""}, "completion", MODELS).core_request.prompt == ""
    chat = parse_request(_chat(messages=[{"role": "user", "content": ""},
                                         {"role": "user", "content": []}]), "chat", MODELS)
    assert [m.content for m in chat.core_request.messages] == ["", ""]


@pytest.mark.parametrize(("body", "param", "kind"), [
    (_chat(messages=[{"role": "user", "content": "hi \ud800 there"}]), "messages[0].content", "chat"),
    (_chat(messages=[{"role": "user", "content": "ok"}, {"role": "user", "content": "\udfff"}]),
     "messages[1].content", "chat"),
    (_chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]),
     "messages[0].content[0].text", "chat"),
    (_chat(messages=[{"role": "user", "content": "x" * 100 + "\ud800"}]), "messages[0].content", "chat"),
    (_chat(messages=[{"role": "user\ud800", "content": "hi"}]), "messages[0].role", "chat"),
    ({"model": "tandem", "prompt": "x\udc00"}, "prompt", "completion"),
    ({"model": "tandem", "prompt": ["x\udc00"]}, "prompt", "completion"),
    (_chat(model="tandem\ud800"), "model", "chat"),
    (_chat(stop="\ud800"), "stop[0]", "chat"),
    (_chat(stop=["a", "\ud800"]), "stop[1]", "chat"),
    (_tandem(category="\ud800"), "tandem.category", "chat"),
])
def test_a_lone_surrogate_in_any_text_is_refused_naming_the_field(body: dict[str, Any], param: str,
                                                                   kind: str) -> None:
    err = _assert_400(body, param, kind)
    json.dumps(err.to_json(), ensure_ascii=False).encode("utf-8")  # the reply itself is valid UTF-8


def test_every_text_the_schema_reads_gets_the_same_surrogate_message() -> None:
    messages = {_refused(body, kind).message.removeprefix(f"{param}: ").split(" (got")[0] for body, param, kind in [
        (_chat(messages=[{"role": "user", "content": "\ud800"}]), "messages[0].content", "chat"),
        ({"model": "tandem", "prompt": "\ud800"}, "prompt", "completion"),
        (_chat(model="\ud800"), "model", "chat"),
        (_chat(stop="\ud800"), "stop[0]", "chat"),
        (_tandem(category="\ud800"), "tandem.category", "chat")]}
    assert len(messages) == 1 and "surrogate" in messages.pop()


def test_huge_fields() -> None:
    _assert_400(_chat(stop=["a", "b", "c", "d", "e"]), "stop")
    text = "x" * (1 << 20)
    stop = "s" * MAX_STOP_CHARS
    parsed = parse_request(_chat(messages=[{"role": "user", "content": text}], stop=[stop]),
                           "chat", MODELS)
    assert parsed.core_request.messages[0].content == text and parsed.stop == (stop,)
    _assert_400(_chat(stop=[stop + "s"]), "stop[0]")
    _assert_400(_chat(stop=stop + "s"), "stop[0]")
    user = {"role": "user", "content": "hi"}
    assert len(parse_request(_chat(messages=[user] * MAX_MESSAGES), "chat", MODELS).core_request.messages) == MAX_MESSAGES
    _assert_400(_chat(messages=[user] * (MAX_MESSAGES + 1)), "messages")
    _assert_400(_chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * (MAX_CONTENT_PARTS + 1)}]),
                "messages[0].content")
    err = _assert_400(_chat(temperature="9" * 1000), "temperature")
    assert len(err.message) < 200  # a huge refused value is not echoed back
    for field in ("seed", "temperature", "max_tokens"):
        assert len(_assert_400(_chat(**{field: 10 ** 5000}), field).message) < 200
    deep: Any = "leaf"
    for _ in range(200):
        deep = {"a": [deep]}
    assert parse_request(_chat(metadata=deep), "chat", MODELS).model == "tandem"


def test_unknown_fields_are_ignored_except_in_the_tandem_extension() -> None:
    parsed = parse_request(_chat(
        user="u1", metadata={"k": "v"}, store=False, future_param=[1, 2],
        messages=[{"role": "user", "name": "bob", "content": [
            {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}]}],
        stream=True, stream_options={"include_usage": True, "include_obfuscation": False}),
        "chat", MODELS)
    assert parsed.core_request.messages[0].content == "a" and parsed.include_usage
    err = _assert_400(_tandem(route="cloud", rout="cloud"), "tandem.rout")
    assert "tandem.route" not in err.message


@pytest.mark.parametrize(("field", "on", "off"), [
    ("tools", [{"type": "function", "function": {"name": "f"}}], []),
    ("functions", [{"name": "f"}], None),
    ("tool_choice", "auto", "none"),
    ("function_call", "auto", "none"),
    ("logprobs", True, False),
    ("top_logprobs", 3, 0),
    ("logit_bias", {"50256": -100}, {}),
    ("presence_penalty", 0.5, 0),
    ("frequency_penalty", -1, 0.0),
    ("response_format", {"type": "json_object"}, {"type": "text"}),
    ("best_of", 2, 1),
    ("echo", True, False),
    ("suffix", "}", ""),
])
def test_unsupported_parameters_only_at_their_off_value(field: str, on: Any, off: Any) -> None:
    err = _assert_400(_chat(**{field: on}), field)
    assert "not supported" in err.message
    assert parse_request(_chat(**{field: off}), "chat", MODELS).model == "tandem"


def test_unknown_model_is_404_and_reported_before_other_errors() -> None:
    err = _refused(_chat(model="gpt-4o", temperature=9, messages=[]))
    assert (err.status, err.param, err.code) == (404, "model", "model_not_found")
    assert "gpt-4o" in err.message and "tandem-cloud" in err.message


def test_model_pins_the_route_and_a_conflicting_route_is_refused() -> None:
    assert parse_request(_chat(model="tandem-local"), "chat", MODELS
                         ).core_request.options.route == orchestrator_pb2.ROUTE_LOCAL
    same = parse_request(_chat(model="tandem-cloud", tandem={"route": "cloud"}), "chat", MODELS)
    assert same.core_request.options.route == orchestrator_pb2.ROUTE_CLOUD
    asked = parse_request(_tandem(route="speculative"), "chat", MODELS)
    assert asked.core_request.options.route == orchestrator_pb2.ROUTE_SPECULATIVE
    err = _assert_400(_chat(model="tandem-local", tandem={"route": "cloud"}), "tandem.route")
    assert "tandem-local" in err.message


def test_accepted_chat_body_reaches_the_core_request() -> None:
    parsed = parse_request(_chat(
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Say"},
                                               {"type": "text", "text": "hi"}]},
                  {"role": "assistant", "content": "Hi?"}],
        max_tokens=16, max_completion_tokens=16, temperature=0.5, top_p=0.9, seed=7,
        stop="END", stream=False, stream_options={"include_usage": True},
        tandem={"privacy": "cloud_quality", "use_personal_context": True, "deadline_ms": 5000,
                "ttft_budget_ms": 300, "category": "email", "context_chunks": 4}),
        "chat", MODELS)
    assert (parsed.kind, parsed.model, parsed.stream, parsed.stop) == ("chat", "tandem", False, ("END",))
    assert not parsed.include_usage  # only a stream has a usage chunk
    req = parsed.core_request
    assert [(m.role, m.content) for m in req.messages] == [
        ("system", "Be brief."), ("user", "Say\nhi"), ("assistant", "Hi?")]
    opts = req.options
    assert opts.max_new_tokens == 16 and opts.route == orchestrator_pb2.ROUTE_AUTO
    assert opts.sampling.temperature == 0.5 and opts.sampling.top_p == pytest.approx(0.9)
    assert opts.sampling.seed == 7 and opts.privacy == orchestrator_pb2.PRIVACY_MODE_CLOUD_QUALITY
    assert opts.use_personal_context and opts.category == "email"
    assert (opts.deadline_ms, opts.ttft_budget_ms, opts.context_chunks) == (5000, 300, 4)


def test_null_means_absent() -> None:
    parsed = parse_request(_chat(temperature=None, top_p=None, seed=None, n=None, stop=None,
                                 max_tokens=None, stream=None, stream_options=None, tandem=None,
                                 tools=None, logprobs=None), "chat", MODELS)
    opts = parsed.core_request.options
    assert opts.sampling.temperature == 1.0 and not opts.sampling.HasField("top_p")
    assert not opts.sampling.HasField("seed") and opts.max_new_tokens == 0
    assert opts.privacy == orchestrator_pb2.PRIVACY_MODE_STRICT and parsed.stop == ()
    assert not parsed.stream and not parsed.include_usage


def test_completion_prompt_as_a_string_or_an_array_of_one() -> None:
    for prompt in ("def f():", ["def f():"]):
        parsed = parse_request({"model": "tandem-speculative", "prompt": prompt, "stream": True,
                                "stream_options": {"include_usage": True}}, "completion", MODELS)
        assert parsed.core_request.prompt == "def f():" and not parsed.core_request.messages
        assert parsed.include_usage and parsed.kind == "completion"
        assert parsed.core_request.options.route == orchestrator_pb2.ROUTE_SPECULATIVE


@pytest.mark.parametrize("raw", [b'{"model": NaN}', b'{"temperature": Infinity}', b"[]", b"\xff",
                                 b"{", b"", b"null"])
def test_decode_body_refuses_anything_but_a_json_object(raw: bytes) -> None:
    with pytest.raises(ApiError) as info:
        decode_body(raw)
    assert (info.value.status, info.value.param, info.value.code) == (400, None, None)


def test_openapi_document_is_generated_from_the_models() -> None:
    doc = json.loads(json.dumps(openapi_document()))  # plain JSON
    schemas = doc["components"]["schemas"]
    assert set(schemas["ChatCompletionRequest"]["properties"]) == set(
        ChatCompletionRequest.model_fields)
    assert schemas["ChatCompletionRequest"]["required"] == ["model", "messages"]
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            refs.update([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs)
    tandem = schemas["TandemOptions"]
    assert tandem["additionalProperties"] is False
    assert tandem["properties"]["deadline_ms"]["anyOf"][0]["maximum"] == MAX_DEADLINE_MS
    assert tandem["properties"]["category"]["anyOf"][0]["maxLength"] == 64
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["maxLength" if "maxLength" in chat["messages"] else "maxItems"] == MAX_MESSAGES
    assert chat["max_tokens"]["anyOf"][0]["maximum"] == MAX_NEW_TOKENS


def test_error_json_matches_the_documented_error_model() -> None:
    body = error_json("busy", "rate_limit_error", None, "rate_limit_exceeded")
    assert ErrorResponse.model_validate(body, strict=True).model_dump() == body
