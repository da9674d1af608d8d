"""The SDK refuses what it cannot send, naming the argument, and a closed client says so.

No server: every refusal happens before a call, and a closed channel needs no peer.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

import tandem_sdk
from tandem_sdk import _calls, _convert

SURROGATE = "a\ud800b"  # a lone surrogate: a str that has no UTF-8 encoding
ONE_YEAR_S = 365 * 24 * 3600  # the SDK's documented largest timeout


@pytest.mark.parametrize("name", ["timeout_s", "generate_timeout_s"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e12, ONE_YEAR_S + 1, True, 0, -1])
def test_a_timeout_that_is_not_a_usable_deadline_is_refused_naming_it(name: str, value: float) -> None:
    for cls in (tandem_sdk.Client, tandem_sdk.AsyncClient):
        with pytest.raises(ValueError, match=f"^{name}:"):
            cls("127.0.0.1:1", **{name: value})


def test_the_largest_timeout_is_accepted() -> None:
    client = tandem_sdk.Client("127.0.0.1:1", timeout_s=ONE_YEAR_S, generate_timeout_s=ONE_YEAR_S)
    client.close()
    assert client.timeout_s == client.generate_timeout_s == ONE_YEAR_S == getattr(_calls, "MAX_TIMEOUT_S", None)


@pytest.mark.parametrize("name", ["deadline_s", "ttft_budget_s"])
@pytest.mark.parametrize("value", [1e10, 2**32 / 1000, float("inf"), True])
def test_a_deadline_the_wire_cannot_hold_is_refused_naming_it(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{name}:"):
        _convert.generate_request(prompt="x", **{name: value})


def test_the_largest_wire_deadline_is_accepted() -> None:
    request = _convert.generate_request(prompt="x", deadline_s=(2**32 - 1) / 1000, ttft_budget_s=0.001)
    assert (request.options.deadline_ms, request.options.ttft_budget_ms) == (2**32 - 1, 1)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"prompt": SURROGATE}, "prompt"),
    ({"messages": [{"role": "user", "content": SURROGATE}]}, "messages[0].content"),
    ({"messages": [tandem_sdk.Message("user", "ok"), tandem_sdk.Message(SURROGATE, "x")]}, "messages[1].role"),
    ({"prompt": "x", "category": SURROGATE}, "category"),
])
def test_text_with_a_lone_surrogate_is_refused_naming_the_argument(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(name) + ": ") as info:
        _convert.generate_request(**kwargs)
    assert not isinstance(info.value, UnicodeError)


@pytest.mark.parametrize("name", ["text", "title", "kind", "source"])
def test_document_text_with_a_lone_surrogate_is_refused_naming_the_argument(name: str) -> None:
    kwargs = {"text": "t", "title": "x", "kind": "note", "source": "", name: SURROGATE}
    with pytest.raises(ValueError, match=f"^{name}: ") as info:
        _convert.add_document_request(**kwargs)
    assert not isinstance(info.value, UnicodeError)


def test_ids_and_addresses_with_a_lone_surrogate_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="^id: ") as info:
        _convert.document_id(SURROGATE)
    assert not isinstance(info.value, UnicodeError)
    with pytest.raises(ValueError, match="^address: ") as info:
        tandem_sdk.Client("127.0.0.1:\udcff")
    assert not isinstance(info.value, UnicodeError)
    with pytest.raises(ValueError, match="^server_name: ") as info:
        tandem_sdk.Client("127.0.0.1:1", tls=True, server_name=SURROGATE)
    assert not isinstance(info.value, UnicodeError)


def test_calls_on_a_closed_client_raise_client_closed() -> None:
    client = tandem_sdk.Client("127.0.0.1:1")
    early = client.generate(prompt="made before close")
    client.close()
    calls = [client.status, client.list_documents, lambda: client.add_document("t", title="x"),
             lambda: client.complete(prompt="hi"), lambda: next(early)]
    for call in calls:
        with pytest.raises(tandem_sdk.ClientClosed, match="client is closed"):
            call()
    assert issubclass(tandem_sdk.ClientClosed, tandem_sdk.TandemError)


def test_calls_on_a_closed_async_client_raise_client_closed() -> None:
    async def run() -> None:
        client = tandem_sdk.AsyncClient("127.0.0.1:1")
        early = client.generate(prompt="made before close")
        await client.close()
        with pytest.raises(tandem_sdk.ClientClosed, match="client is closed"):
            await client.status()
        with pytest.raises(tandem_sdk.ClientClosed, match="client is closed"):
            await client.delete_document("d")
        with pytest.raises(tandem_sdk.ClientClosed, match="client is closed"):
            await client.complete(prompt="hi")
        with pytest.raises(tandem_sdk.ClientClosed, match="client is closed"):
            await early.result()

    asyncio.run(run())
