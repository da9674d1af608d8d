"""Private personal context never reaches the cloud: every route, privacy mode, sampling mode and
cut, against everything the cloud node receives (real stack, tiny models).

The orchestrator has a real personal store (SQLite + all-MiniLM-L6-v2) holding a private note
(SECRET) and a shareable one (SHARED), both relevant to the question. What the cloud receives is
kept twice (`tests.support.recorder`): by an interceptor on the cloud node (method, metadata and
every request message of every call type) and by a byte tap between the link shaper and the
cloud node. The secret is searched as token-id sequences in every id the cloud got (contexts,
drafts concatenated across rounds and resumed streams, q rows position by position), as text
in each of those views decoded whole, and as bytes in the metadata and on the link.

The matrix: route (speculative, cloud, and auto steered to each of them by setting the cost
model it learned, its choice asserted) x privacy (strict, cloud_quality) x greedy/sampling x
with/without the link cut after the first delta. Strict keeps the request on the device and
nothing but health probes reaches the cloud; cloud_quality drops the private chunks and sends
the shareable ones, which the recorder must see (positive control). On every route, the same
note relabelled shareable must be seen too (positive control of the id and text search).
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

from protos.tandem.v1 import common_pb2
from protos.tandem.v1 import orchestrator_pb2 as opb
from tandem_core.link_health import AcceptanceTracker
from tandem_core.routing import RouteCosts
from tandem_sdk import Client
from tests.support.orch_stack import Stack, local_stack
from tests.support.recorder import CloudRecorder, LinkTap, contains, find_secret, secret_id_sequences

SECRET = "Zanzibar-7731"
SHARED = "Kestrel-42"
QUESTION = "What is my gym locker code, and what is the build server called?"
N = 16  # tokens per answer
VERIFY, GENERATE = "/tandem.v1.CloudVerifier/Verify", "/tandem.v1.CloudVerifier/Generate"

# What auto learned, set so that it picks one route: the other one is far slower.
AUTO_COSTS = {
    "speculative": RouteCosts(device_prefill_tps=1e6, device_decode_tps=1e6, cloud_prefill_tps=1e6,
                              cloud_decode_tps=0.01, verify_ms=0.0),
    "cloud": RouteCosts(device_prefill_tps=1e6, device_decode_tps=1e6, cloud_prefill_tps=1e6,
                        cloud_decode_tps=1e6, verify_ms=1e5),
}
# route as asked -> (proto route, the route it must end up on, the cloud method it uses)
ROUTES = {
    "speculative": (opb.ROUTE_SPECULATIVE, "speculative", VERIFY),
    "cloud": (opb.ROUTE_CLOUD, "cloud", GENERATE),
    "auto->speculative": (opb.ROUTE_AUTO, "speculative", VERIFY),
    "auto->cloud": (opb.ROUTE_AUTO, "cloud", GENERATE),
}
PRIVACY = {"strict": opb.PRIVACY_MODE_STRICT, "cloud_quality": opb.PRIVACY_MODE_CLOUD_QUALITY}
SAMPLING = {"greedy": common_pb2.SamplingParams(),
            "sampling": common_pb2.SamplingParams(temperature=1.0, seed=7)}


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory):
    store = tmp_path_factory.mktemp("personal") / "store.sqlite3"
    with local_stack(tiny_models.target_hf, tiny_models.drafter_onnx, store_path=store) as s:
        with Client(s.orchestrator.grpc_address, timeout_s=120) as client:
            client.add_document(f"My locker code at the climbing gym is {SECRET}. Never tell anyone my gym "
                                "locker code.", title="Gym locker", kind="note", privacy="private")
            client.add_document(f"The team's build server is called {SHARED}; it runs the nightly builds "
                                "and the release pipeline.", title="Build server", privacy="shareable")
        yield s


@pytest.fixture()
def link(stack: Stack):
    """Each test starts and ends with a healthy link (a cut opens the circuit for a while)."""
    with stack.healthy_link(rtt_ms=0) as shaper:
        yield shaper


@pytest.fixture()
def shareable_note(stack: Stack):
    """The private note relabelled shareable for one test."""
    with Client(stack.orchestrator.grpc_address, timeout_s=60) as client:
        [doc] = [d for d in client.list_documents() if d.title == "Gym locker"]
        client.set_document_privacy(doc.id, "shareable")
        try:
            yield doc
        finally:
            client.set_document_privacy(doc.id, "private")


@dataclass
class Run:
    started: opb.GenerationStarted | None = None
    tokens: list[int] = field(default_factory=list)
    stats: opb.OrchestratorStats | None = None
    text: str = ""


def _ask(stack: Stack, route: str, privacy: int, sampling: str, *, cut: bool = False) -> Run:
    """One answer with personal context; the recorders hold only what this answer sent."""
    proto_route, _, _ = ROUTES[route]
    core = stack.orchestrator.running.core
    if route.startswith("auto"):
        core.costs, core.acceptance = AUTO_COSTS[ROUTES[route][1]], AcceptanceTracker()
    if cut:
        stack.shaper.set_conditions(rtt_ms=40)  # rounds slow enough for the cut to land mid-answer
    stack.recorder.clear()
    assert stack.tap is not None
    stack.tap.clear()
    request = opb.GenerateTextRequest(prompt=QUESTION, options=opb.GenerateOptions(
        route=proto_route, privacy=privacy, use_personal_context=True, max_new_tokens=N,
        sampling=SAMPLING[sampling]))
    run = Run()
    for msg in stack.stub.Generate(request, timeout=120):
        kind = msg.WhichOneof("kind")
        if kind == "started":
            run.started = msg.started
        elif kind == "delta":
            if cut and not run.tokens and msg.delta.tokens:
                stack.shaper.drop_connections()
            run.tokens += msg.delta.tokens
        else:
            run.stats = msg.stats
    assert run.started is not None and run.stats is not None
    return run


def _secret_seen(stack: Stack, secret: str = SECRET) -> list[str]:
    ids = secret_id_sequences(lambda text: stack.drafter.encode(prompt=text), secret)
    return find_secret(stack.recorder, secret, ids, stack.drafter.decode, stack.tap)


def _cloud_calls(stack: Stack) -> list[str]:
    return [m for m in stack.recorder.methods() if m.startswith("/tandem.v1.CloudVerifier/")]


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut"])
@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("privacy", list(PRIVACY))
@pytest.mark.parametrize("route", list(ROUTES))
def test_private_context_never_reaches_the_cloud(stack, link, route, privacy, sampling, cut) -> None:
    run = _ask(stack, route, PRIVACY[privacy], sampling, cut=cut)
    _, expected, method = ROUTES[route]
    assert run.started is not None and run.stats is not None
    assert "Gym locker" in {c.title for c in run.stats.citations} or privacy == "cloud_quality"
    if privacy == "strict":
        assert run.started.route == "local" and "private" in run.started.reason
        assert not _cloud_calls(stack), "only health probes may reach the cloud"
    else:
        assert run.started.route == expected, run.started.reason
        assert run.started.private_chunks_dropped >= 1
        assert {c.privacy for c in run.started.citations} == {opb.PRIVACY_SHAREABLE}
        assert method in _cloud_calls(stack)
        assert _secret_seen(stack, SHARED), "the recorder must see the shareable context (positive control)"
        if cut and expected == "speculative":  # a cloud-only answer may be streamed whole before the cut
            assert run.stats.switches, "the cut did not land mid-answer"
    assert _secret_seen(stack) == []


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut"])
@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("route", list(ROUTES))
def test_the_same_note_relabelled_shareable_is_seen_on_every_route(stack, link, shareable_note, route, sampling,
                                                                   cut) -> None:
    run = _ask(stack, route, PRIVACY["strict"], sampling, cut=cut)
    _, expected, method = ROUTES[route]
    assert run.started is not None
    assert run.started.route == expected and run.started.private_chunks_dropped == 0, run.started.reason
    assert method in _cloud_calls(stack)
    seen = _secret_seen(stack)
    assert "context 0 hold the secret's ids" in seen and "decoded context 0" in seen, seen


def test_strict_privacy_uses_the_private_note_on_the_device(stack, link) -> None:
    run = _ask(stack, "speculative", PRIVACY["strict"], "greedy")
    assert run.started is not None and run.started.route == "local"
    titles = {c.title: c.privacy for c in run.started.citations}
    assert titles.get("Gym locker") == opb.PRIVACY_PRIVATE, "the private note was retrieved and used on the device"
    assert not _cloud_calls(stack)


def test_grpc_requests_default_to_strict_privacy(stack, link) -> None:
    run = _ask(stack, "cloud", opb.PRIVACY_MODE_UNSPECIFIED, "greedy")
    assert run.started is not None and run.started.route == "local" and "strict" in run.started.reason
    assert not _cloud_calls(stack) and _secret_seen(stack) == []


def _chat(stack: Stack, messages: list[tuple[str, str]], route: int, privacy: int, personal: bool) -> Run:
    stack.recorder.clear()
    request = opb.GenerateTextRequest(
        messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        options=opb.GenerateOptions(route=route, privacy=privacy, use_personal_context=personal, max_new_tokens=N))
    run, text = Run(), []
    for msg in stack.stub.Generate(request, timeout=120):
        kind = msg.WhichOneof("kind")
        if kind == "started":
            run.started = msg.started
        elif kind == "delta":
            run.tokens += msg.delta.tokens
            text.append(msg.delta.text)
        else:
            run.stats = msg.stats
    run.text = "".join(text)
    return run


@pytest.mark.parametrize("privacy", list(PRIVACY))
def test_an_answer_drawn_from_a_private_note_stays_on_the_device_when_sent_back_as_history(stack, link,
                                                                                          privacy) -> None:
    """Turn 1 is answered on the device from the private note; turn 2 sends that answer back as
    history with a question that retrieves nothing private: it must stay on the device too, in
    either privacy mode and whatever route is asked, and so must a turn 3 quoting turn 2's answer."""
    first = _chat(stack, [("user", QUESTION)], opb.ROUTE_AUTO, PRIVACY["strict"], True)
    assert first.started is not None and first.started.route == "local" and first.text.strip()
    later = "Now write a haiku about autumn leaves."
    for asked in (opb.ROUTE_SPECULATIVE, opb.ROUTE_CLOUD, opb.ROUTE_AUTO):
        second = _chat(stack, [("user", QUESTION), ("assistant", first.text), ("user", later)], asked,
                       PRIVACY[privacy], personal=False)
        assert second.started is not None and second.started.route == "local", second.started.reason
        assert "answer drawn from private documents" in second.started.reason
        assert not _cloud_calls(stack), "only health probes may reach the cloud"
    # whitespace a client adds or drops, and an answer cut short (>= 16 characters) still match
    cut = " ".join(first.text.split())[:16]
    if len(" ".join(first.text.split())) >= 16:
        third = _chat(stack, [("user", QUESTION), ("assistant", f"  {cut}\n"), ("user", later)],
                      opb.ROUTE_SPECULATIVE, PRIVACY[privacy], personal=False)
        assert third.started is not None and third.started.route == "local", third.started.reason
    # the answer to a conversation that quoted it is drawn from it too
    fourth = _chat(stack, [("user", later), ("assistant", second.text), ("user", "And another one?")],
                   opb.ROUTE_SPECULATIVE, PRIVACY[privacy], personal=False)
    assert fourth.started is not None and fourth.started.route == "local", fourth.started.reason
    # control: the same conversation with an answer the device never gave goes to the cloud
    control = _chat(stack, [("user", QUESTION), ("assistant", "I cannot tell you that, sorry."), ("user", later)],
                    opb.ROUTE_SPECULATIVE, PRIVACY[privacy], personal=False)
    assert control.started is not None and control.started.route == "speculative", control.started.reason
    assert VERIFY in _cloud_calls(stack)


def _http_chat(stack: Stack, tandem: dict) -> dict:
    body = {"model": "tandem", "max_tokens": N, "messages": [{"role": "user", "content": QUESTION}],
            "tandem": {"use_personal_context": True, **tandem}}
    request = urllib.request.Request(f"http://{stack.orchestrator.http_address}/v1/chat/completions",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    stack.recorder.clear()
    assert stack.tap is not None
    stack.tap.clear()
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


@pytest.mark.parametrize("route", ["speculative", "cloud", "auto"])
def test_the_http_endpoint_defaults_to_strict_privacy(stack, link, route) -> None:
    if route == "auto":
        stack.orchestrator.running.core.costs = AUTO_COSTS["cloud"]
    reply = _http_chat(stack, {"route": route})
    assert reply["tandem"]["route"] == "local", reply["tandem"]["reason"]
    assert "strict" in reply["tandem"]["reason"]
    assert not _cloud_calls(stack) and _secret_seen(stack) == []
    # Control: the same request with cloud_quality said does use the cloud, without the note.
    if route == "auto":
        stack.orchestrator.running.core.costs = AUTO_COSTS["cloud"]
    reply = _http_chat(stack, {"route": route, "privacy": "cloud_quality"})
    assert reply["tandem"]["route"] == ("cloud" if route == "auto" else route)
    assert _cloud_calls(stack) and _secret_seen(stack) == [] and _secret_seen(stack, SHARED)


def test_document_calls_reject_bad_input_with_a_status_naming_the_field(stack) -> None:
    from tandem_sdk import InvalidArgument, NotFound

    with Client(stack.orchestrator.grpc_address, timeout_s=60, retries=0) as client:
        with pytest.raises(InvalidArgument, match="text"):
            client.add_document("   ", title="blank")
        with pytest.raises(InvalidArgument, match="kind"):
            client.add_document("some text", title="t", kind="diary")
        with pytest.raises(NotFound):
            client.set_document_privacy("no-such-id", "shareable")
        assert client.delete_document("no-such-id") is False
        before = {d.id for d in client.list_documents()}
        doc = client.add_document("A short note about tea.", title="tea", privacy="shareable")
        assert doc.privacy == "shareable" and doc.chunks >= 1 and doc.id not in before
        assert client.delete_document(doc.id) is True
        assert {d.id for d in client.list_documents()} == before


# --- the recorder itself: every call type, metadata, ids split across messages -----------------


def _identity(data: bytes) -> bytes:
    return data


@pytest.fixture(scope="module")
def echo_server():
    """A gRPC server with one method of each call type, recorded by a `CloudRecorder` and behind
    a `LinkTap`: the recorder's own tests."""
    import grpc

    def drain(requests, context):
        return b"".join(requests)

    handlers = {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(lambda r, c: r, _identity, _identity),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(lambda r, c: iter([r]), _identity, _identity),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(drain, _identity, _identity),
        "StreamStream": grpc.stream_stream_rpc_method_handler(lambda rs, c: iter(list(rs)), _identity, _identity),
    }
    from concurrent.futures import ThreadPoolExecutor

    recorder = CloudRecorder()
    server = grpc.server(ThreadPoolExecutor(max_workers=4), interceptors=[recorder])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with LinkTap(f"127.0.0.1:{port}") as tap, grpc.insecure_channel(tap.address) as channel:
            yield recorder, tap, channel
    finally:
        server.stop(None)


@pytest.mark.parametrize("kind", ["UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream", "Missing"])
def test_the_recorder_keeps_every_call_type_its_metadata_and_its_bytes(echo_server, kind) -> None:
    import grpc

    recorder, tap, channel = echo_server
    recorder.clear()
    tap.clear()
    body, note = f"body {SECRET} body".encode(), f"note {SHARED}"
    method = f"/test.Echo/{kind}"
    metadata = (("x-note", note),)
    call: dict = {
        "UnaryUnary": lambda: channel.unary_unary(method)(body, metadata=metadata, timeout=10),
        "UnaryStream": lambda: list(channel.unary_stream(method)(body, metadata=metadata, timeout=10)),
        "StreamUnary": lambda: channel.stream_unary(method)(iter([body[:7], body[7:]]), metadata=metadata,
                                                           timeout=10),
        "StreamStream": lambda: list(channel.stream_stream(method)(iter([body[:7], body[7:]]), metadata=metadata,
                                                                  timeout=10)),
    }
    if kind == "Missing":  # unary: the body goes out with the headers, before UNIMPLEMENTED comes back
        with pytest.raises(grpc.RpcError):
            channel.unary_unary(method)(body, metadata=metadata, timeout=10)
    else:
        call[kind]()
    [recorded] = recorder.calls
    assert recorded.method == method and ("x-note", note) in recorded.metadata
    assert note.encode() in recorder.raw()
    if kind != "Missing":  # a method the server lacks has no messages to decode; the tap has them
        assert b"".join(recorded.messages) == body
    deadline = time.monotonic() + 5
    while SECRET.encode() not in b"".join(tap.grpc_messages()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "link gRPC messages" in find_secret(recorder, SECRET, [], bytes.decode, tap)


def test_the_id_search_sees_a_secret_split_across_rounds_streams_and_q_rows() -> None:
    from protos.tandem.v1 import cloud_pb2

    secret, other = [11, 12, 13, 14, 15, 16], [1, 2, 3]
    recorder = CloudRecorder()

    def receive(*messages: cloud_pb2.VerifyRequest) -> None:
        for m in messages:
            recorder.add(VERIFY, m)

    def open_(generated: list[int]) -> cloud_pb2.VerifyRequest:
        return cloud_pb2.VerifyRequest(open=cloud_pb2.SessionSpec(prompt_tokens=other, generated_tokens=generated))

    def round_(drafts: list[int], rows: list[list[int]] | None = None) -> cloud_pb2.VerifyRequest:
        q = [common_pb2.SparseDist(ids=r, probs=[1 / len(r)] * len(r)) for r in rows or []]
        return cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(draft_tokens=drafts, q_rows=q))

    def seen() -> list[str]:
        return find_secret(recorder, "never-as-text", [secret], lambda ids: " ".join(map(str, ids)))

    # Across two rounds and a resumed stream (its open, carrying the context, comes between).
    receive(open_([]), round_([4, 11, 12]), round_([13, 14]), open_([5, 6]), round_([15, 16, 7]))
    assert "draft ids hold the secret's ids" in seen()
    assert not any(contains(ids, secret) for ids in recorder.token_lists()), "no single message holds it"
    # One id per q row, over consecutive rows of two rounds; the drafts themselves are other ids.
    recorder.clear()
    rows = [[s, 40 + i, 80 + i] for i, s in enumerate(secret)]
    receive(open_([]), round_([40, 41, 42], rows[:3]), round_([43, 44, 45], rows[3:]))
    assert seen() == ["q rows hold the secret's ids"]
    # In the committed tokens of a resumed stream.
    recorder.clear()
    receive(open_([9, *secret]))
    assert "context 0 hold the secret's ids" in seen()



# --- retrieval drafts (issue 17) ----------------------------------------------------------------
# The edge drafts by copying from its prompt (`tandem_core.lookup`), so what a draft may carry is
# exactly what the prompt holds: the private chunks the orchestrator drops never reach the edge's
# index on a route the cloud sees (the matrix above runs with retrieval on, the edge's default).
# This positive control shows that copies do cross the wire as drafts, so the matrix would see one.

def test_retrieval_drafts_carry_the_prompts_own_text_to_the_cloud_positive_control(stack, link) -> None:
    import grpc

    from protos.tandem.v1 import edge_pb2, edge_pb2_grpc

    key = [200 + i for i in range(20)]        # a long span the prompt repeats at its end
    span = [300 + 7 * i for i in range(12)]  # what followed it the first time
    prompt = key + span + [50, 51, 52, 53] + key
    stack.recorder.clear()
    with grpc.insecure_channel(stack.edge_address) as channel:
        stub = edge_pb2_grpc.EdgeNodeStub(channel)
        stats = None
        for msg in stub.Generate(edge_pb2.EdgeGenerateRequest(prompt_tokens=prompt, max_new_tokens=8,
                                                              mode=edge_pb2.EDGE_MODE_SPECULATIVE), timeout=60):
            if msg.WhichOneof("kind") == "stats":
                stats = msg.stats
    assert stats is not None and stats.route == "speculative" and stats.retrieval_drafted >= 7
    drafts = stack.recorder.sent_ids().drafts
    assert contains(drafts, span[:7])  # the first round copied what followed the key (7 = the budget's room)


# A note whose text ends like the prompt the orchestrator builds for COPY_ASK (the question, then
# the tiny chat template's end of turn and assistant header), followed by COPY_SPAN: the edge's
# index matches the prompt's whole tail in the note and proposes COPY_SPAN as the first round's
# drafts. Labelled shareable it is injected and copied; labelled private it is dropped, and no id
# of COPY_SPAN may reach the cloud in any form.
COPY_ASK = "Hello, how are you today? Tell me about the river."
COPY_SPAN = " The river shapes the valley over many years. def add(a, b): return a + b"


@pytest.mark.parametrize("label", ["shareable", "private"])
def test_a_note_that_holds_the_answer_feeds_drafts_only_when_shareable(stack, link, label) -> None:
    with Client(stack.orchestrator.grpc_address, timeout_s=60) as client:
        doc = client.add_document(f"{COPY_ASK}<eos><|assistant|>{COPY_SPAN}", title="River notes",
                                  privacy=label)
    try:
        stack.recorder.clear()
        request = opb.GenerateTextRequest(prompt=COPY_ASK, options=opb.GenerateOptions(
            route=opb.ROUTE_SPECULATIVE, privacy=PRIVACY["cloud_quality"], use_personal_context=True,
            max_new_tokens=N))
        started = stats = None
        for msg in stack.stub.Generate(request, timeout=120):
            kind = msg.WhichOneof("kind")
            started = msg.started if kind == "started" else started
            stats = msg.stats if kind == "stats" else stats
        assert started is not None and stats is not None and started.route == "speculative"
        span = stack.drafter.encode(prompt=" shapes the valley over many")
        sent = stack.recorder.sent_ids()
        if label == "shareable":
            assert "River notes" in {c.title for c in started.citations}
            assert stats.generation.retrieval_drafted > 0
            assert contains(sent.drafts, span), "the shareable note's text was copied into the drafts"
        else:
            assert started.private_chunks_dropped >= 1
            assert not contains(sent.all, span) and not contains(sent.drafts, span)
            assert _secret_seen(stack, COPY_SPAN.strip()) == []
    finally:
        with Client(stack.orchestrator.grpc_address, timeout_s=60) as client:
            client.delete_document(doc.id)
