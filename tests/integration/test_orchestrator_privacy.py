"""Private personal context never reaches the cloud: recorded traffic, real stack.

The cloud node (tiny target) records every message it receives; the orchestrator has a real
personal store (SQLite + all-MiniLM-L6-v2). A private and a shareable document are both relevant
to the question. In strict mode the request stays on the device; in cloud-quality mode the
private chunk is dropped and the shareable one goes to the cloud. The shareable document's text
showing up in the recorded prompts proves the recorder sees what the cloud sees.
"""

from __future__ import annotations

import pytest

from tandem_sdk import Client
from tests.support.orch_stack import Stack, local_stack

SECRET = "Zanzibar-7731"
SHARED = "Kestrel-42"
QUESTION = "What is my gym locker code, and what is the build server called?"


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


def _ask(stack: Stack, **options):
    stack.recorder.messages.clear()
    with Client(stack.orchestrator.grpc_address, timeout_s=120) as client:
        return client.complete(prompt=QUESTION, use_personal_context=True, max_new_tokens=12, **options)


def _cloud_saw(stack: Stack) -> str:
    """Everything the cloud received, as text: decoded token lists plus the raw message bytes."""
    decoded = [stack.drafter.decode(ids) for ids in stack.recorder.token_lists() if ids]
    return "\n".join(decoded) + stack.recorder.raw().decode("utf-8", errors="replace")


def test_strict_privacy_keeps_the_request_on_the_device(stack) -> None:
    result = _ask(stack, route="speculative", privacy="strict")
    assert result.started.route == "local"
    assert "private" in result.started.reason
    titles = {c.title: c.privacy for c in result.started.citations}
    assert titles.get("Gym locker") == "private", "the private note was retrieved and used on the device"
    assert SECRET not in _cloud_saw(stack)
    assert not stack.recorder.token_lists(), "nothing but health probes reached the cloud"


def test_strict_privacy_overrides_a_cloud_route_request(stack) -> None:
    result = _ask(stack, route="cloud")
    assert result.started.route == "local"
    assert SECRET not in _cloud_saw(stack)


def test_cloud_quality_drops_the_private_chunks_and_sends_the_shareable_ones(stack) -> None:
    result = _ask(stack, route="speculative", privacy="cloud_quality")
    assert result.started.route == "speculative"
    assert result.started.private_chunks_dropped >= 1
    assert {c.privacy for c in result.started.citations} == {"shareable"}
    saw = _cloud_saw(stack)
    assert SHARED in saw, "the recorder must see the shareable context the cloud got (positive control)"
    assert SECRET not in saw
    assert result.stats.private_chunks_dropped == result.started.private_chunks_dropped


def test_cloud_quality_with_auto_routing_never_leaks(stack) -> None:
    result = _ask(stack, route="auto", privacy="cloud_quality")
    assert result.started.route in ("speculative", "cloud", "local")
    assert SECRET not in _cloud_saw(stack)


def test_relabelling_a_document_shareable_lets_it_reach_the_cloud(stack) -> None:
    with Client(stack.orchestrator.grpc_address, timeout_s=60) as client:
        [doc] = [d for d in client.list_documents() if d.title == "Gym locker"]
        client.set_document_privacy(doc.id, "shareable")
        try:
            result = _ask(stack, route="speculative", privacy="strict")
            assert result.started.route == "speculative" and result.started.private_chunks_dropped == 0
            assert SECRET in _cloud_saw(stack)
        finally:
            client.set_document_privacy(doc.id, "private")


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
