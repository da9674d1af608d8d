"""The orchestrator's request checks (`orchestrator.validation`), without a server.

A refusal is a `BadRequest` whose field is the field the caller sent and whose message starts
with that field once.
"""

from __future__ import annotations

import pytest

from orchestrator.errors import BadRequest
from orchestrator.validation import check_add, check_text, parse_generate
from protos.tandem.v1 import common_pb2
from protos.tandem.v1 import orchestrator_pb2 as opb


def _parse(request: opb.GenerateTextRequest) -> None:
    parse_generate(request, max_prompt_chars=1000, default_max_new_tokens=16, default_chunks=2)


def _refusal(request: opb.GenerateTextRequest) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        _parse(request)
    assert str(info.value).startswith(f"{info.value.field}: ")
    assert not str(info.value).removeprefix(f"{info.value.field}: ").startswith(info.value.field)
    return info.value


def test_an_empty_prompt_is_refused_as_empty() -> None:
    err = _refusal(opb.GenerateTextRequest(prompt=""))
    assert err.field == "prompt" and "empty" in str(err) and "exactly one" not in str(err)


def test_a_prompt_and_messages_together_are_refused_as_two() -> None:
    err = _refusal(opb.GenerateTextRequest(prompt="a", messages=[common_pb2.ChatMessage(role="user", content="b")]))
    assert str(err) == "prompt: give exactly one of prompt or messages"


def test_a_nul_in_the_prompt_names_the_prompt() -> None:
    err = _refusal(opb.GenerateTextRequest(prompt="a\x00b"))
    assert str(err) == "prompt: must not contain NUL characters"


def test_a_nul_in_a_message_names_that_message_s_content() -> None:
    messages = [common_pb2.ChatMessage(role="user", content="ok"), common_pb2.ChatMessage(role="user", content="\x00")]
    err = _refusal(opb.GenerateTextRequest(messages=messages))
    assert str(err) == "messages[1].content: must not contain NUL characters"


def test_text_with_a_lone_surrogate_is_refused_naming_the_field() -> None:
    for value in ("\ud800", "hi \udc00 there", "\U0001f642\udfff"):
        with pytest.raises(BadRequest) as info:
            check_text("title", value)
        assert info.value.field == "title" and "surrogate" in str(info.value)
    assert check_text("title", "é \U0001f642 \x00") == "é \U0001f642 \x00"


@pytest.mark.parametrize("name", ["title", "text", "source"])
def test_a_document_with_a_nul_is_refused_naming_the_field(name: str) -> None:
    fields = {"title": "t", "text": "body", "source": "s", name: "a\x00b"}
    with pytest.raises(BadRequest) as info:
        check_add(opb.AddDocumentRequest(**fields))
    assert str(info.value) == f"{name}: must not contain NUL characters"
    check_add(opb.AddDocumentRequest(title="t", text="body", source="s"))  # the same without NUL passes
