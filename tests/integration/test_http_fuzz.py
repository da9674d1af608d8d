"""Property-based fuzzing (hypothesis) of the orchestrator's OpenAI-compatible HTTP endpoint.

Bodies are drawn by hand-written strategies that follow the request schema that `GET
/openapi.json` publishes (a test below checks every field they use is in it): mostly valid
requests with one or more fields replaced by a value of the wrong type (a string for a number,
a float for an integer, an object for a list...), extreme numbers (2^64, -1, 1e308), NaN and
infinities (sent as JSON's non-standard `NaN`/`Infinity` tokens), empty and huge strings, too
many messages or stop sequences, unknown fields, nested junk; plus raw bodies that are not JSON,
not UTF-8 or cut short, and wrong methods and paths.

Property: every reply is 200 or a documented 4xx (400, 404, 405, 413, 429) in OpenAI's error
shape `{"error": {message, type, param, code}}` with a short message and no traceback; never a
500. A 200 is a chat completion, or an event stream ending in `[DONE]`. Afterwards health is
SERVING, no generation is left running, and a normal request succeeds.

The core is the real one over a fake edge node (`tests/support/orch_stack.fake_edge_stack`).
Profiles as in `test_orchestrator_fuzz`: a quick fixed-seed run in the normal test command; a
long run with `TANDEM_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -s tests/integration/test_http_fuzz.py`.
"""

from __future__ import annotations

import http.client
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.integration.test_orchestrator_fuzz import QUICK, TRIED, assert_serving, fuzz, report
from tests.support.orch_stack import FakeStack, fake_edge_stack

DOCUMENTED = {200, 400, 404, 405, 413, 429}
MODELS = ["tandem", "tandem-local", "tandem-speculative", "tandem-cloud"]

NUMBERS = st.one_of(st.integers(-2, 10), st.sampled_from([2**31, 2**32, 2**63, 2**64, -(2**63), 10**30]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1e308, -0.0]))
STRINGS = st.one_of(st.text(max_size=30), st.sampled_from(["", "x" * 257, "é" * 100_001, "\x00", "tandem"]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS)
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "developer"]), JUNK),
                                 "content": st.one_of(STRINGS, st.lists(st.fixed_dictionaries(
                                     {"type": st.one_of(st.just("text"), JUNK), "text": st.one_of(STRINGS, JUNK)}),
                                     max_size=3), JUNK)})
TANDEM_KEYS = ["route", "privacy", "use_personal_context", "deadline_ms", "ttft_budget_ms", "category",
               "context_chunks", "typo"]
TANDEM = st.dictionaries(st.sampled_from(TANDEM_KEYS),
                         st.one_of(JUNK, st.sampled_from(["auto", "local", "cloud", "strict", "cloud_quality"])),
                         max_size=4)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.one_of(st.sampled_from(MODELS), JUNK),
    "messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), st.just([{"role": "user", "content": "x"}] * 513),
                          JUNK),
    "max_tokens": st.one_of(st.integers(1, 6), JUNK), "max_completion_tokens": st.one_of(st.integers(1, 6), JUNK),
    "temperature": NUMBERS, "top_p": NUMBERS, "seed": NUMBERS, "n": st.one_of(st.just(1), JUNK),
    "stop": st.one_of(STRINGS, st.lists(STRINGS, max_size=6), JUNK),
    "stream": st.one_of(st.booleans(), JUNK),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), JUNK)}), JUNK),
    "tandem": st.one_of(TANDEM, JUNK), "tools": JUNK, "logprobs": JUNK, "response_format": JUNK,
    "user": JUNK, "metadata": JUNK, "unknown_field": JUNK,
}


@st.composite
def chat_bodies(draw: Any) -> dict[str, Any]:
    """A valid small request, then some of its fields replaced or added from FIELDS."""
    body: dict[str, Any] = {"model": draw(st.sampled_from(MODELS)), "max_tokens": draw(st.integers(1, 6)),
                            "messages": [{"role": "user", "content": draw(st.text(max_size=20))}]}
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True)):
        body[name] = draw(FIELDS[name])
    if draw(st.integers(0, 9)) == 0:
        del body[draw(st.sampled_from(sorted(body)))]
    return body


@st.composite
def raw_cases(draw: Any) -> tuple[str, str, bytes]:
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/tandem",
                                 "/v1/models/" + "m" * 300, "/openapi.json", "/v1/nope", "/v1/chat/completions/"]))
    method = draw(st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE"]))
    valid = json.dumps({"model": "tandem", "prompt": "hi", "max_tokens": 2}).encode()
    body = draw(st.one_of(st.binary(max_size=100), st.just(valid[: draw(st.integers(0, len(valid)))]),
                          st.sampled_from([b"", b"null", b"[]", b"\xff\xfe", b'{"model": NaN}', b"{" * 5000,
                                           b'"just a string"', b"x" * (5 << 20)])))
    return method, path, body


def _request(stack: FakeStack, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    host, port = stack.orchestrator.http_address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_reply(status: int, data: bytes, streamed: bool) -> None:
    assert status in DOCUMENTED, (status, data[:300])
    if status != 200:
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert len(error["message"]) <= 500 and "Traceback" not in error["message"], error
        return
    if streamed:
        events = [line for line in data.decode().split("\n\n") if line]
        assert events[-1] == "data: [DONE]" or '"error"' in events[-1], events[-3:]
        return
    reply = json.loads(data)
    assert "openapi" in reply or reply["object"] in ("chat.completion", "text_completion", "list", "model")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeStack]:
    with fake_edge_stack(tmp_path_factory.mktemp("http-fuzz") / "store.sqlite3") as s:
        yield s


def test_the_strategies_follow_the_published_schema(stack: FakeStack) -> None:
    status, data = _request(stack, "GET", "/openapi.json", b"")
    schemas = json.loads(data)["components"]["schemas"]
    published = set(schemas["ChatCompletionRequest"]["properties"])
    assert set(FIELDS) - {"user", "metadata", "unknown_field"} <= published
    assert set(TANDEM_KEYS) - {"typo"} <= set(schemas["TandemOptions"]["properties"])


def test_chat_bodies_fuzz(stack: FakeStack) -> None:
    @fuzz(QUICK * 3)
    @given(chat_bodies())
    def one(body: dict[str, Any]) -> None:
        TRIED["HTTP chat body"] += 1
        raw = json.dumps(body).encode()  # NaN and Infinity go out as JSON's non-standard tokens
        status, data = _request(stack, "POST", "/v1/chat/completions", raw)
        check_reply(status, data, streamed=body.get("stream") is True)
        nan_sent = any(isinstance(v, float) and not math.isfinite(v) for v in body.values())
        assert not (nan_sent and status == 200), "NaN and infinities are never accepted"

    one()
    report("HTTP chat body")
    assert_serving(stack.orchestrator.grpc_address, stack.core)


def test_raw_bodies_methods_and_paths_fuzz(stack: FakeStack) -> None:
    @fuzz()
    @given(raw_cases())
    def one(case: tuple[str, str, bytes]) -> None:
        TRIED["HTTP raw"] += 1
        status, data = _request(stack, *case)
        check_reply(status, data, streamed=False)

    one()
    report("HTTP raw")
    status, data = _request(stack, "POST", "/v1/chat/completions", json.dumps(
        {"model": "tandem", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode())
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 4
    assert_serving(stack.orchestrator.grpc_address, stack.core)
