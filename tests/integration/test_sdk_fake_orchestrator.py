"""The SDK (sync and asyncio) and the client CLI against a FAKE orchestrator on a real gRPC server.

The fake scripts its answers by prompt: a normal answer (started, one delta per word, stats),
UNAVAILABLE twice before the first message, a delta then UNAVAILABLE, INVALID_ARGUMENT, a hang,
and an answer that waits for the test between its deltas (to prove the CLI streams). It records
every request, the attempts per prompt and the deadline each call arrived with.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import tandem_sdk
from protos.tandem.v1 import common_pb2
from protos.tandem.v1 import orchestrator_pb2 as pb
from protos.tandem.v1 import orchestrator_pb2_grpc as pb_grpc
from tandem.cli.client import DEFAULT_ADDRESS, resolve_address
from tests.support.orch_server import orchestrator_server

ROOT = Path(__file__).resolve().parents[2]
BAD_DETAILS = "options.max_new_tokens: must be <= 4096"
SLACK_S = 0.1  # the server's view of a deadline can exceed the client's timeout by clock skew


class FakeOrchestrator(pb_grpc.OrchestratorServicer):
    def __init__(self) -> None:
        self.requests: list[pb.GenerateTextRequest] = []
        self.attempts: Counter[str] = Counter()
        self.remaining: dict[str, list[float | None]] = defaultdict(list)
        self.fail_unary: Counter[str] = Counter()  # method -> UNAVAILABLE answers still to give
        self.hang = False
        self.release = threading.Event()
        self.docs: dict[str, pb.Document] = {}

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        self.attempts[method] += 1
        self.remaining[method].append(context.time_remaining())
        if self.hang:
            self._hang(context)
        if self.fail_unary[method] > 0:
            self.fail_unary[method] -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, f"fake {method} not ready")

    @staticmethod
    def _hang(context: grpc.ServicerContext) -> None:
        while context.is_active():
            time.sleep(0.01)
        context.abort(grpc.StatusCode.CANCELLED, "gone")

    def Generate(self, request, context):
        key = request.prompt or "chat"
        self.requests.append(request)
        self._enter(key, context)
        if key == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, BAD_DETAILS)
        if key == "hang":
            self._hang(context)
        if key in ("fail-twice", "always-unavailable") and (key != "fail-twice" or self.attempts[key] <= 2):
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake edge warming up")
        route = {pb.ROUTE_CLOUD: "cloud", pb.ROUTE_SPECULATIVE: "speculative"}.get(request.options.route, "local")
        yield pb.GenerateTextResponse(started=pb.GenerationStarted(route=route, reason="fake route"))
        if key == "break-after-delta":
            yield pb.GenerateTextResponse(delta=pb.TextDelta(text="partial", tokens=[1], source="verified"))
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake link cut")
        if key == "wait-after-first":
            yield pb.GenerateTextResponse(delta=pb.TextDelta(text="first-chunk "))
            if not self.release.wait(20):
                context.abort(grpc.StatusCode.ABORTED, "fake: the client did not stream the first chunk")
        words = _answer(request).split(" ")
        for i, word in enumerate(words):
            yield pb.GenerateTextResponse(delta=pb.TextDelta(text=word if i == 0 else " " + word, tokens=[i]))
        gen = common_pb2.GenerationStats(route=route, generated_tokens=len(words),
                                         finish_reason=common_pb2.FINISH_REASON_STOP, verified_tokens=len(words))
        yield pb.GenerateTextResponse(stats=pb.OrchestratorStats(route=route, reason="fake route", generation=gen,
                                                                 ttft_ms=12.0, tokens_per_s=50.0))

    def AddDocument(self, request, context):
        self._enter("AddDocument", context)
        if not request.text.strip():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text: must not be empty")
        doc = pb.Document(id=f"doc-{len(self.docs) + 1}", title=request.title, kind=request.kind or "document",
                          privacy=request.privacy or pb.PRIVACY_PRIVATE, chunks=1, bytes=len(request.text),
                          source=request.source)
        self.docs[doc.id] = doc
        return doc

    def DeleteDocument(self, request, context):
        self._enter("DeleteDocument", context)
        return pb.DeleteDocumentResponse(deleted=self.docs.pop(request.id, None) is not None)

    def ListDocuments(self, request, context):
        self._enter("ListDocuments", context)
        return pb.ListDocumentsResponse(documents=list(self.docs.values()))

    def SetDocumentPrivacy(self, request, context):
        self._enter("SetDocumentPrivacy", context)
        if request.id not in self.docs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no document {request.id}")
        self.docs[request.id].privacy = request.privacy
        return self.docs[request.id]

    def Status(self, request, context):
        self._enter("Status", context)
        link = pb.LinkStatus(state="up", circuit="closed", rtt_ms=21.5, rtt_jitter_ms=2.0)
        return pb.StatusResponse(link=link, recent_acceptance=0.8, acceptance_by_category={"code": 0.9},
                                 models=[pb.ModelInfo(role="drafter", name="fake-0.5b", where="edge", loaded=True)],
                                 documents=len(self.docs), edge_healthy=True)


def _answer(request: pb.GenerateTextRequest) -> str:
    if request.prompt:
        return request.prompt
    users = [m.content for m in request.messages if m.role == "user"]
    return f"answer {len(users)} to {users[-1]}"


@dataclass
class Fake:
    servicer: FakeOrchestrator
    address: str


@pytest.fixture()
def fake() -> Iterator[Fake]:
    servicer = FakeOrchestrator()
    with orchestrator_server(servicer, workers=8) as address:
        yield Fake(servicer, address)
        servicer.release.set()


# --- sync client -------------------------------------------------------------------------------


def test_fake_stream_gives_typed_deltas_started_and_stats(fake: Fake) -> None:
    with tandem_sdk.Client(fake.address, timeout_s=5) as client:
        gen = client.generate(prompt="hello fake world", route="speculative", max_new_tokens=9, seed=4)
        deltas = list(gen)
    assert [d.text for d in deltas] == ["hello", " fake", " world"] and deltas[1].tokens == (1,)
    assert gen.text == "hello fake world" and gen.done
    assert gen.started == tandem_sdk.Started(route="speculative", reason="fake route")
    assert gen.stats is not None and (gen.stats.route, gen.stats.generated_tokens) == ("speculative", 3)
    assert (gen.stats.finish_reason, gen.stats.ttft_ms, gen.stats.verified_tokens) == ("stop", 12.0, 3)
    opts = fake.servicer.requests[-1].options
    assert (opts.route, opts.max_new_tokens, opts.sampling.seed) == (pb.ROUTE_SPECULATIVE, 9, 4)


def test_fake_unavailable_before_first_message_is_retried(fake: Fake) -> None:
    with tandem_sdk.Client(fake.address, retries=3, backoff_s=0.01) as client:
        gen = client.generate(prompt="fail-twice")
        result = gen.result()
    assert result.text == "fail-twice" and result.stats is not None
    assert fake.servicer.attempts["fail-twice"] == 3  # gRPC retried twice (counted server-side)


def test_fake_retries_are_bounded(fake: Fake) -> None:
    with tandem_sdk.Client(fake.address, retries=2, backoff_s=0.01) as client, \
            pytest.raises(tandem_sdk.Unavailable, match="^UNAVAILABLE: fake edge warming up$"):
        client.complete(prompt="always-unavailable")
    assert fake.servicer.attempts["always-unavailable"] == 3


def test_fake_unavailable_after_a_delta_raises_and_is_not_retried(fake: Fake) -> None:
    with tandem_sdk.Client(fake.address, retries=3, backoff_s=0.01) as client:
        gen = client.generate(prompt="break-after-delta")
        first = next(gen)
        with pytest.raises(tandem_sdk.Unavailable) as info:
            next(gen)
    assert first.text == "partial" and gen.text == "partial"
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.details == "fake link cut"
    assert fake.servicer.attempts["break-after-delta"] == 1


def test_fake_invalid_argument_carries_the_details(fake: Fake) -> None:
    with tandem_sdk.Client(fake.address, retries=3) as client, pytest.raises(tandem_sdk.InvalidArgument) as info:
        client.complete(prompt="bad")
    assert info.value.details == BAD_DETAILS and str(info.value) == f"INVALID_ARGUMENT: {BAD_DETAILS}"
    assert isinstance(info.value, tandem_sdk.TandemError) and fake.servicer.attempts["bad"] == 1


def test_fake_hang_ends_in_deadline_exceeded(fake: Fake) -> None:
    with tandem_sdk.Client(fake.address, timeout_s=0.5) as client:
        t0 = time.monotonic()
        with pytest.raises(tandem_sdk.DeadlineExceeded):
            client.complete(prompt="hang", deadline_s=0.3)
        assert time.monotonic() - t0 < 10  # bounded by the deadline, not by the hang
        fake.servicer.hang = True
        with pytest.raises(tandem_sdk.DeadlineExceeded):
            client.status()
    # the stream's transport deadline is the request's (plus grace); unary calls get timeout_s
    assert fake.servicer.requests[-1].options.deadline_ms == 300
    assert 0 < fake.servicer.remaining["hang"][0] <= 0.3 + 0.5 + SLACK_S
    assert 0 < fake.servicer.remaining["Status"][0] <= 0.5 + SLACK_S


def test_fake_documents_and_status_round_trip(fake: Fake) -> None:
    with tandem_sdk.Client(fake.address, timeout_s=5, backoff_s=0.01) as client:
        doc = client.add_document("I live in Lyon.", title="home", kind="profile", source="/x/home.txt")
        note = client.add_document("Likes tea.", title="tea", privacy="shareable")
        assert (doc.id, doc.title, doc.kind, doc.privacy, doc.bytes, doc.source) == \
            ("doc-1", "home", "profile", "private", 15, "/x/home.txt")
        assert [d.id for d in client.list_documents()] == ["doc-1", "doc-2"] and note.privacy == "shareable"
        assert client.set_document_privacy("doc-1", "shareable").privacy == "shareable"
        assert client.delete_document("doc-2") is True and client.delete_document("doc-2") is False
        with pytest.raises(tandem_sdk.NotFound, match="no document nope"):
            client.set_document_privacy("nope", "private")
        with pytest.raises(tandem_sdk.InvalidArgument, match="text: must not be empty"):
            client.add_document("  ", title="empty")
        fake.servicer.fail_unary["Status"] = 2
        status = client.status()
    assert fake.servicer.attempts["Status"] == 3  # two UNAVAILABLE answers retried
    assert fake.servicer.attempts["SetDocumentPrivacy"] == 2  # NOT_FOUND is not retried
    assert (status.link.state, status.link.circuit, status.link.rtt_ms, status.link.rtt_jitter_ms) == ("up", "closed", 21.5, 2.0)
    assert status.acceptance_by_category["code"] == pytest.approx(0.9) and status.documents == 1
    assert status.models == (tandem_sdk.ModelInfo("drafter", "fake-0.5b", "edge", True),) and status.edge_healthy
    assert all(r is not None and r <= 5 + SLACK_S for rs in fake.servicer.remaining.values() for r in rs)


# --- asyncio client ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_fake_stream_retry_and_no_retry_after_a_delta(fake: Fake) -> None:
    async with tandem_sdk.AsyncClient(fake.address, timeout_s=5, backoff_s=0.01) as client:
        gen = client.generate(messages=[tandem_sdk.Message("user", "hi")], route="cloud")
        texts = [d.text async for d in gen]
        assert texts == ["answer", " 1", " to", " hi"] and gen.text == "answer 1 to hi"
        assert gen.started is not None and gen.started.route == "cloud" and gen.stats is not None
        assert gen.stats.generated_tokens == 4 and gen.stats.finish_reason == "stop"

        retried = client.generate(prompt="fail-twice")
        assert (await retried.result()).text == "fail-twice"

        broken = client.generate(prompt="break-after-delta")
        with pytest.raises(tandem_sdk.Unavailable, match="fake link cut"):
            async for _ in broken:
                pass
        assert broken.text == "partial"
    assert fake.servicer.attempts["fail-twice"] == 3 and fake.servicer.attempts["break-after-delta"] == 1


@pytest.mark.asyncio
async def test_async_fake_errors_deadline_documents_status(fake: Fake) -> None:
    async with tandem_sdk.AsyncClient(fake.address, timeout_s=0.5, backoff_s=0.01) as client:
        with pytest.raises(tandem_sdk.InvalidArgument) as info:
            await client.complete(prompt="bad")
        assert info.value.details == BAD_DETAILS
        with pytest.raises(tandem_sdk.DeadlineExceeded):
            await client.complete(prompt="hang", deadline_s=0.2)
        doc = await client.add_document("text", title="t", kind="note", privacy="shareable")
        assert (doc.kind, doc.privacy) == ("note", "shareable")
        assert (await client.set_document_privacy(doc.id, "private")).privacy == "private"
        assert [d.id for d in await client.list_documents()] == [doc.id]
        assert await client.delete_document(doc.id) is True
        fake.servicer.fail_unary["Status"] = 1
        status = await client.status()
        assert status.link.state == "up" and fake.servicer.attempts["Status"] == 2
        fake.servicer.hang = True
        with pytest.raises(tandem_sdk.DeadlineExceeded):
            await client.list_documents()
    assert 0 < fake.servicer.remaining["hang"][0] <= 0.2 + 0.5 + SLACK_S


# --- the CLI, as real processes ----------------------------------------------------------------


def _env() -> dict[str, str]:
    """The environment of a CLI process: no address from the outside, and stdout buffered as
    it is for a user's pipe (so only the CLI's own flushes make text arrive early)."""
    return {k: v for k, v in os.environ.items() if k not in ("TANDEM_ADDRESS", "PYTHONUNBUFFERED")}


def _cli(*argv: str, stdin: str | None = None, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = _env()
    if home is not None:
        env["TANDEM_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "tandem", *argv], input=stdin, check=False, capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)


def test_cli_generate_streams_and_reports_stats(fake: Fake, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "tandem", "generate", "wait-after-first", "--address", fake.address,
            "--route", "cloud", "--max-new-tokens", "5", "--seed", "3", "--temperature", "0.5", "--stats"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**_env(), "TANDEM_HOME": str(tmp_path)})
    assert proc.stdout is not None
    first = proc.stdout.read(len(b"first-chunk "))  # arrives while the fake holds the rest back
    fake.servicer.release.set()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert first + out == b"first-chunk wait-after-first\n"
    assert "route: cloud (fake route)" in err.decode() and "stats: 1 tokens (stop)" in err.decode()
    opts = fake.servicer.requests[-1].options
    assert (opts.route, opts.max_new_tokens, opts.sampling.seed) == (pb.ROUTE_CLOUD, 5, 3)
    assert opts.sampling.temperature == pytest.approx(0.5)


def test_cli_generate_json_and_invalid_argument(fake: Fake) -> None:
    done = _cli("generate", "two words", "--json", "--personal", "--privacy", "cloud_quality", "--address", fake.address)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["text"] == "two words" and doc["stats"]["generated_tokens"] == 2 and doc["started"]["route"] == "local"
    opts = fake.servicer.requests[-1].options
    assert opts.use_personal_context and opts.privacy == pb.PRIVACY_MODE_CLOUD_QUALITY
    bad = _cli("generate", "bad", "--address", fake.address)
    assert bad.returncode == 2 and BAD_DETAILS in bad.stderr and "Traceback" not in bad.stderr


def test_cli_chat_from_a_pipe_keeps_the_history(fake: Fake) -> None:
    done = _cli("chat", "--address", fake.address, "--system", "be brief",
                stdin="first question\n\nsecond question\n/exit\nnever sent\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "answer 1 to first question\nanswer 2 to second question\n"
    assert len(fake.servicer.requests) == 2
    second = [(m.role, m.content) for m in fake.servicer.requests[1].messages]
    assert second == [("system", "be brief"), ("user", "first question"),
                      ("assistant", "answer 1 to first question"), ("user", "second question")]


def test_cli_chat_reset_clears_the_history(fake: Fake) -> None:
    done = _cli("chat", "--address", fake.address, stdin="one\n/reset\ntwo\n")  # ends at EOF
    assert done.returncode == 0, done.stderr
    assert done.stdout == "answer 1 to one\nanswer 1 to two\n" and "history cleared" in done.stderr
    assert [(m.role, m.content) for m in fake.servicer.requests[1].messages] == [("user", "two")]


def test_cli_docs_add_list_rm_privacy(fake: Fake, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.md").write_text("beta")
    added = _cli("docs", "add", str(tmp_path / "a.txt"), str(tmp_path / "b.md"), "--shareable", "--kind", "note",
                 "--address", fake.address)
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines() == ["doc-1\tshareable\tnote\t1 chunks\ta.txt", "doc-2\tshareable\tnote\t1 chunks\tb.md"]
    assert fake.servicer.docs["doc-1"].source == str(tmp_path / "a.txt")
    listed = _cli("docs", "list", "--address", fake.address)
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == ["id", "doc-1", "doc-2"]
    relabelled = _cli("docs", "privacy", "doc-1", "private", "--address", fake.address)
    assert relabelled.returncode == 0 and relabelled.stdout.startswith("doc-1\tprivate")
    removed = _cli("docs", "rm", "doc-1", "--address", fake.address)
    assert removed.returncode == 0 and removed.stdout == "deleted doc-1\n"
    assert list(fake.servicer.docs) == ["doc-2"]
    again = _cli("docs", "rm", "doc-1", "--address", fake.address)
    assert again.returncode == 2 and "no document with id 'doc-1'" in again.stderr
    missing = _cli("docs", "add", str(tmp_path / "nope.txt"), "--address", fake.address)
    assert missing.returncode == 2 and "nope.txt" in missing.stderr and fake.servicer.attempts["AddDocument"] == 2


def test_cli_unreachable_orchestrator_exits_2_naming_the_address(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    for argv in (["generate", "hi"], ["docs", "list"]):
        done = _cli(*argv, "--address", address, home=tmp_path)
        assert done.returncode == 2, done.stderr
        assert address in done.stderr and "tandem up" in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_resolve_address_flag_env_stack_file_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    monkeypatch.delenv("TANDEM_ADDRESS", raising=False)
    assert resolve_address(None) == DEFAULT_ADDRESS == "127.0.0.1:7070"
    stack = tmp_path / "run" / "stack.json"
    stack.parent.mkdir()
    stack.write_text(json.dumps({"orchestrator_grpc": "127.0.0.1:7555", "edge_grpc": "127.0.0.1:1"}))
    assert resolve_address(None) == "127.0.0.1:7555"
    monkeypatch.setenv("TANDEM_ADDRESS", "10.0.0.2:7000")
    assert resolve_address(None) == "10.0.0.2:7000"
    assert resolve_address("host:9") == "host:9"
    monkeypatch.delenv("TANDEM_ADDRESS")
    stack.write_text("{not json")
    from tandem.cli.main import CliError

    with pytest.raises(CliError, match="stack.json"):
        resolve_address(None)
