"""The SDK imports and works with grpcio and protobuf alone, its conversions are exact, and its
retry arguments become a valid gRPC service config (tests/integration/test_sdk_retries.py
shows gRPC acting on it).

The subprocess blocks the heavy packages with a meta-path finder, imports `tandem_sdk`, serves a
fake orchestrator in-process and streams an answer from it with both clients; none of the
blocked modules may end up loaded.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tandem_sdk
from protos.tandem.v1 import common_pb2, orchestrator_pb2
from tandem_sdk import _convert
from tandem_sdk._retry import RetryPolicy, channel_options

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "transformers", "onnxruntime", "onnxruntime_genai", "ray", "numpy", "aiohttp")

_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = set(sys.argv[1].split(","))

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"blocked heavy module: {name}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())

    import asyncio
    from concurrent import futures
    import grpc
    import tandem_sdk
    from protos.tandem.v1 import orchestrator_pb2 as pb, orchestrator_pb2_grpc as pb_grpc

    class FakeLightOrchestrator(pb_grpc.OrchestratorServicer):
        def Generate(self, request, context):
            yield pb.GenerateTextResponse(started=pb.GenerationStarted(route="local", reason="fake"))
            for word in request.prompt.split():
                yield pb.GenerateTextResponse(delta=pb.TextDelta(text=word.upper(), source="local"))
            yield pb.GenerateTextResponse(stats=pb.OrchestratorStats(route="local", reason="fake"))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_OrchestratorServicer_to_server(FakeLightOrchestrator(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with tandem_sdk.Client(f"127.0.0.1:{port}", timeout_s=5) as client:
        result = client.complete(prompt="a b c")
    assert (result.text, result.stats.route, result.started.reason) == ("ABC", "local", "fake"), result

    async def use_async():
        async with tandem_sdk.AsyncClient(f"127.0.0.1:{port}", timeout_s=5) as client:
            return await client.complete(prompt="x y")
    assert asyncio.run(use_async()).text == "XY"
    server.stop(None)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("light ok")
""")


def test_sdk_works_with_heavy_packages_blocked() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, ",".join(BLOCKED)],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "light ok"


def test_blocker_really_blocks() -> None:
    """Prove the subprocess's finder can fail: importing a blocked module raises."""
    script = _SCRIPT.split("import asyncio")[0] + "import numpy\n"
    result = subprocess.run([sys.executable, "-c", script, "numpy"], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "blocked heavy module: numpy" in result.stderr


def _stats_proto() -> orchestrator_pb2.OrchestratorStats:
    gen = common_pb2.GenerationStats(
        route="speculative", generated_tokens=40, acceptance_rate=0.75, finish_reason=common_pb2.FINISH_REASON_LENGTH,
        local_tokens=10, verified_tokens=30, ttft_ms=80.0, tokens_per_s=20.0,
        switches=[common_pb2.RouteSwitch(at_token=3, from_route="cloud", to_route="local", reason="edge")],
    )
    return orchestrator_pb2.OrchestratorStats(
        route="speculative", reason="link up", generation=gen, ttft_ms=95.0, tokens_per_s=18.5,
        citations=[orchestrator_pb2.Citation(document_id="d1", title="t", chunk_index=2, score=0.5,
                                             privacy=orchestrator_pb2.PRIVACY_SHAREABLE)],
        private_chunks_dropped=1,
        switches=[common_pb2.RouteSwitch(at_token=7, from_route="speculative", to_route="local",
                                         reason="link down", at_ms=12.5)],
    )


def test_stats_proto_converts_to_the_typed_dataclass() -> None:
    stats = _convert.stats(_stats_proto())
    assert (stats.route, stats.reason, stats.generated_tokens, stats.finish_reason) == ("speculative", "link up", 40, "length")
    assert (stats.ttft_ms, stats.tokens_per_s, stats.edge_ttft_ms, stats.edge_tokens_per_s) == (95.0, 18.5, 80.0, 20.0)
    assert (stats.local_tokens, stats.verified_tokens, stats.acceptance_rate) == (10, 30, 0.75)
    # the orchestrator's switches win over the edge's when it reports any
    switches = [(s.at_token, s.from_route, s.to_route, s.reason) for s in stats.switches]
    assert switches == [(7, "speculative", "local", "link down")]
    assert stats.citations[0].privacy == "shareable" and stats.citations[0].chunk_index == 2
    assert stats.private_chunks_dropped == 1
    with pytest.raises(AttributeError):
        stats.route = "cloud"  # type: ignore[misc]


def test_stats_fall_back_to_the_edge_switches_and_unknown_finish() -> None:
    proto = _stats_proto()
    del proto.switches[:]
    proto.generation.finish_reason = common_pb2.FINISH_REASON_UNSPECIFIED
    stats = _convert.stats(proto)
    assert [(s.from_route, s.to_route) for s in stats.switches] == [("cloud", "local")]
    assert stats.finish_reason is None
    proto.generation.finish_reason = common_pb2.FINISH_REASON_STOP
    assert _convert.stats(proto).finish_reason == "stop"


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"prompt": "x", "route": "fast"}, "route"),
    ({"prompt": "x", "privacy": "private"}, "privacy"),
    ({"prompt": "x", "max_new_tokens": -1}, "max_new_tokens"),
    ({"prompt": "x", "seed": -3}, "seed"),
    ({"prompt": "x", "deadline_s": -1.0}, "deadline_s"),
    ({}, "prompt"),
    ({"prompt": "x", "messages": []}, "prompt"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"messages": "hello"}, "messages"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(name)):
        _convert.generate_request(**kwargs)


def test_request_carries_every_option() -> None:
    req = _convert.generate_request(
        messages=[{"role": "user", "content": "hi"}], route="cloud", max_new_tokens=7, temperature=0.5,
        top_k=3, top_p=0.9, seed=11, deadline_s=1.2341, ttft_budget_s=0.2, privacy="cloud_quality",
        use_personal_context=True, category="code",
    )
    o = req.options
    assert [(m.role, m.content) for m in req.messages] == [("user", "hi")] and not req.prompt
    assert (o.route, o.privacy) == (orchestrator_pb2.ROUTE_CLOUD, orchestrator_pb2.PRIVACY_MODE_CLOUD_QUALITY)
    assert (o.max_new_tokens, o.deadline_ms, o.ttft_budget_ms, o.category) == (7, 1235, 200, "code")
    assert o.use_personal_context and o.sampling.top_k == 3 and o.sampling.seed == 11
    assert o.sampling.HasField("top_p") and abs(o.sampling.top_p - 0.9) < 1e-6
    assert not _convert.generate_request(prompt="x").options.sampling.HasField("seed")


def test_document_privacy_and_ids_are_checked() -> None:
    with pytest.raises(ValueError, match="^privacy"):
        _convert.add_document_request("t", title="x", privacy="public")
    with pytest.raises(ValueError, match="^id"):
        _convert.document_id("")
    doc = _convert.document(orchestrator_pb2.Document(id="a", title="b", privacy=orchestrator_pb2.PRIVACY_UNSPECIFIED))
    assert (doc.privacy, doc.kind) == ("private", "document")


def test_retry_policy_is_a_service_config_for_the_orchestrator_service() -> None:
    policy = RetryPolicy(retries=2, backoff_s=0.1, max_backoff_s=0.15)
    config = json.loads(policy.service_config())
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "tandem.v1.Orchestrator"}]
    assert orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name == "tandem.v1.Orchestrator"
    assert method["retryPolicy"] == {
        "maxAttempts": 3, "initialBackoff": "0.100000000s", "maxBackoff": "0.150000000s",
        "backoffMultiplier": 2.0, "retryableStatusCodes": ["UNAVAILABLE"],
    }
    assert "retryPolicy" not in json.loads(RetryPolicy(retries=0).service_config())["methodConfig"][0]
    options = dict(channel_options(policy, [("grpc.max_receive_message_length", 1 << 20)]))
    assert options["grpc.enable_retries"] == 1 and options["grpc.service_config"] == policy.service_config()
    assert options["grpc.max_receive_message_length"] == 1 << 20
    assert dict(channel_options(policy, [("grpc.enable_retries", 0)]))["grpc.enable_retries"] == 0  # caller wins


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"retries": -1}, "retries"),
    ({"retries": 5}, "retries"),  # gRPC caps maxAttempts at 5
    ({"retries": 1.5}, "retries"),
    ({"backoff_s": 0}, "backoff_s"),
    ({"backoff_s": 0.5, "max_backoff_s": 0.1}, "max_backoff_s"),
    ({"max_backoff_s": float("inf")}, "max_backoff_s"),
    ({"max_backoff_s": 1e300}, "max_backoff_s"),  # gRPC refused the service config: every call failed
    ({"backoff_s": float("nan")}, "backoff_s"),
    ({"backoff_s": True}, "backoff_s"),
])
def test_retry_arguments_are_checked(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match="^" + name + ":"):
        RetryPolicy(**kwargs)
    with pytest.raises(ValueError, match="^" + name + ":"):
        tandem_sdk.Client("127.0.0.1:1", **kwargs)
