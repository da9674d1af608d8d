"""The orchestrator's client surfaces against the real stack (tiny models, 127.0.0.1): the SDK (sync
and asyncio), the OpenAI-compatible endpoint through the official `openai` client, Status, health,
and bad requests answered with INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.tandem.v1 import common_pb2
from protos.tandem.v1 import orchestrator_pb2 as opb
from tandem_sdk import AsyncClient, Client, DeadlineExceeded, InvalidArgument
from tests.support.orch_stack import local_stack

PROMPT = "def add(a, b):\n    return a + b\n"  # the tiny models answer it at length (no early eos)


@pytest.fixture(scope="module")
def stack(tiny_models):
    with local_stack(tiny_models.target_hf, tiny_models.drafter_onnx) as s:
        yield s


@pytest.fixture()
def client(stack):
    with Client(stack.orchestrator.grpc_address, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=f"http://{stack.orchestrator.http_address}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def test_health_and_status(stack, client, tiny_models) -> None:
    with grpc.insecure_channel(stack.orchestrator.grpc_address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="tandem.v1.Orchestrator"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    s = client.status()
    assert s.link.state == "up" and s.link.circuit == "closed" and s.link.rtt_ms > 0
    assert s.edge_healthy
    roles = {m.role: m for m in s.models}
    assert roles["drafter"].name == tiny_models.drafter_onnx.name and roles["drafter"].loaded


@pytest.mark.parametrize("route", ["local", "speculative", "cloud"])
def test_sdk_stream_on_each_route(client, route) -> None:
    answer = client.generate(prompt=PROMPT, route=route, max_new_tokens=20)
    deltas = list(answer)
    assert answer.started.route == route
    assert "".join(d.text for d in deltas) == answer.text
    s = answer.stats
    assert s.route == route and s.generated_tokens == sum(len(d.tokens) for d in deltas) == 20
    assert s.local_tokens + s.verified_tokens == 20
    assert (s.verified_tokens == 20) if route != "local" else (s.local_tokens == 20)
    assert s.ttft_ms > 0 and s.tokens_per_s > 0


def test_speculative_answer_matches_the_cloud_only_answer(client) -> None:
    """Greedy speculative decoding is lossless: the same text as the target generating alone."""
    spec = client.complete(prompt=PROMPT, route="speculative", max_new_tokens=24)
    cloud = client.complete(prompt=PROMPT, route="cloud", max_new_tokens=24)
    assert spec.text == cloud.text
    assert spec.stats.rounds > 0 and cloud.stats.rounds == 0


@pytest.mark.asyncio
async def test_async_client_streams(stack) -> None:
    async with AsyncClient(stack.orchestrator.grpc_address, timeout_s=60) as client:
        answer = client.generate(prompt=PROMPT, route="speculative", max_new_tokens=12)
        text = "".join([d.text async for d in answer])
        assert text == answer.text and answer.stats.generated_tokens == 12


@pytest.mark.parametrize(("options", "field"), [
    (dict(max_new_tokens=100_000), "options.max_new_tokens"),
    (dict(temperature=-1.0), "options.sampling"),
    (dict(top_p=1.5), "options.sampling"),
    (dict(context_chunks=999), "options.context_chunks"),
])
def test_bad_options_are_invalid_argument_naming_the_field(client, options, field) -> None:
    with pytest.raises(InvalidArgument) as info:
        client.complete(prompt=PROMPT, **options)
    assert field in str(info.value)


def test_malformed_raw_requests(stack) -> None:
    with grpc.insecure_channel(stack.orchestrator.grpc_address) as channel:
        stub = opb_stub(channel)
        for request, field in [
            (opb.GenerateTextRequest(), "prompt"),
            (opb.GenerateTextRequest(prompt="x", messages=[common_pb2.ChatMessage(role="user", content="y")]), "prompt"),
            (opb.GenerateTextRequest(messages=[common_pb2.ChatMessage(role="robot", content="y")]), "messages[0].role"),
            (opb.GenerateTextRequest(prompt="x", options=opb.GenerateOptions(route=42)), "options.route"),
            (opb.GenerateTextRequest(prompt="x" * 300_000), "prompt"),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(request, timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in info.value.details()
        # A prompt that does not fit the context with its answer budget.
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(opb.GenerateTextRequest(prompt="hello " * 400,
                                                       options=opb.GenerateOptions(max_new_tokens=400)), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context length" in info.value.details()
    assert Client(stack.orchestrator.grpc_address).status().edge_healthy  # still serving


def opb_stub(channel):
    from protos.tandem.v1 import orchestrator_pb2_grpc

    return orchestrator_pb2_grpc.OrchestratorStub(channel)


def test_openai_models_and_chat(oai) -> None:
    assert {m.id for m in oai.models.list()} >= {"tandem", "tandem-local", "tandem-speculative", "tandem-cloud"}
    r = oai.chat.completions.create(model="tandem-speculative", messages=[{"role": "user", "content": PROMPT}],
                                    max_tokens=16, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 0
    extra = r.model_extra["tandem"]
    assert extra["route"] == "speculative" and extra["verified_tokens"] == 16


def test_openai_chat_stream_equals_non_stream(oai) -> None:
    kwargs = dict(model="tandem-cloud", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0)
    whole = oai.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert chunks[-1].usage.completion_tokens == 16


def test_openai_completions_and_errors(oai) -> None:
    r = oai.completions.create(model="tandem-local", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.usage.completion_tokens == 8 and r.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="tandem", messages=[{"role": "user", "content": "x"}], temperature=-2)
    assert info.value.body["param"] == "temperature" or "temperature" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True, text=True, input=stdin,
                          timeout=120, env=env)


def test_cli_generate_and_chat_against_the_real_orchestrator(stack) -> None:
    address = stack.orchestrator.grpc_address
    out = _cli("generate", PROMPT, "--address", address, "--route", "speculative", "--max-new-tokens", "10", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["stats"]["route"] == "speculative" and result["stats"]["generated_tokens"] == 10
    chat = _cli("chat", "--address", address, "--route", "local", "--max-new-tokens", "6",
                stdin="def add(a, b):\nreturn a + b\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip(), "two answers were streamed"
    bad = _cli("generate", PROMPT, "--address", address, "--max-new-tokens", "100000")
    assert bad.returncode == 2 and "max_new_tokens" in bad.stderr and "Traceback" not in bad.stderr


def test_request_deadline_is_enforced(stack, client) -> None:
    stack.shaper.set_conditions(rtt_ms=300)
    try:
        with pytest.raises(DeadlineExceeded):
            client.complete(prompt=PROMPT, route="speculative", max_new_tokens=60, deadline_s=0.5)
    finally:
        stack.shaper.set_conditions(rtt_ms=0)
    assert client.status().edge_healthy


def test_cancel_before_the_first_message_sends_nothing(stack, client) -> None:
    from tandem_sdk import TandemError

    before = stack.orchestrator.running.core.requests
    answer = client.generate(prompt=PROMPT, route="local", max_new_tokens=8)
    answer.cancel()
    with pytest.raises(TandemError) as info:
        next(iter(answer))
    assert info.value.code == grpc.StatusCode.CANCELLED
    assert stack.orchestrator.running.core.requests == before
