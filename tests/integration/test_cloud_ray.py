"""The cloud node on a real local Ray instance, started by `python -m cloud_node` (one start for
the module: 2 replicas of the tiny fp32 target, half a CPU each), reached through its gateway
(plaintext on loopback, no tokens: the default) and Serve's gRPC proxy.

Checks: greedy speculative output equals target-only; seeded sampling is reproducible; bad input
gets INVALID_ARGUMENT and the app keeps serving; undecodable bytes are INVALID_ARGUMENT and a
fuzzing run through the proxy (the strategies of test_cloud_fuzz.py, FUZZ_EXAMPLES per API) gets
only documented statuses without traceback text; an answer reaching the context ends with
"length" on both routes; concurrent sessions do not mix; the session limit gives
RESOURCE_EXHAUSTED; cancelled streams (also during the open) close their sessions; killing the
replica that serves a stream mid-answer is survived by resuming, with output identical to an
undisturbed run, and the client's status names no pid, address or actor; SessionOpened names
the replica by an opaque tag; health and reflection answer through the proxy; SIGTERM drains (a
live stream ends with UNAVAILABLE "draining"), exits 0 and leaves no process behind.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from hypothesis import given, settings

from cloud_node.servicer import SERVICE_NAME
from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc, common_pb2
from tandem.pair import LocalPair
from tandem_core.loop import Draft
from tandem_core.sampling import SamplingParams
from tests.integration.test_cloud_fuzz import (
    FUZZ,
    LEAK,
    bad_utf8_example,
    check_reply,
    generate_calls,
    send_generate,
    send_verify,
    verify_streams,
)
from tests.support.cloud_client import CloudVerifierClient, draft_round

PROMPTS = [[5, 17, 99, 3, 44], [300], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11)
REPLICAS, MAX_SESSIONS, CONTEXT = 2, 2, 200
RAY_FUZZ_EXAMPLES = 40  # per API, through the proxy; the in-process server takes the bulk
START_TIMEOUT_S = 240


@dataclass
class Cloud:
    proc: subprocess.Popen
    address: str
    log: Path

    def replica_pid(self, tag: str, timeout_s: float = 20) -> int:
        """The pid of the replica whose opaque tag is `tag`, from its `replica TAG is ...` log line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(rf"replica {re.escape(tag)} is \S+ pid=(\d+)", self.log.read_text())
            if found:
                return int(found.group(1))
            time.sleep(0.2)
        raise AssertionError(f"no log line maps replica {tag!r}")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> int:
        """SIGTERM the CLI, wait for it, and make sure no process of its tree survives."""
        tree = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait(10)
        _, alive = psutil.wait_procs(tree, timeout=20)
        for p in alive:  # only processes this test started
            p.kill()
        assert not alive, f"left running after exit: {[(p.pid, p.name()) for p in alive]}"
        return rc


def start_cloud(argv: list[str], log: Path) -> Cloud:
    """`python -m cloud_node ARGV`, started in its own session; returns once it printed its ready
    line (fails the test with the log's tail if it does not)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "TANDEM_CLOUD_"))}
    env["RAY_DEDUP_LOGS"] = "0"  # every replica log line reaches the log (one test reads them)
    proc = subprocess.Popen([sys.executable, "-m", "cloud_node", *argv], stdout=subprocess.PIPE,
                            stderr=log.open("w"), stdin=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        line = ""
    if not line.startswith("cloud grpc="):
        Cloud(proc, "", log).stop()
        pytest.fail(f"cloud node did not start: {line!r}\n{log.read_text()[-3000:]}")
    return Cloud(proc, line.split("=", 1)[1].strip(), log)


@pytest.fixture(scope="module")
def cloud(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    cloud = start_cloud(["--port", "0", "--model-dir", str(tiny_models.target_hf), "--dtype", "fp32", "--replicas",
                         str(REPLICAS), "--replica-cpus", "0.5", "--max-sessions", str(MAX_SESSIONS),
                         "--max-context", str(CONTEXT), "--max-draft-len", "8", "--max-new-tokens", "64"],
                        tmp_path_factory.mktemp("cloud") / "cloud.log")
    try:
        yield cloud
    finally:
        cloud.stop()


@pytest.fixture(scope="module")
def pair(tiny_models) -> LocalPair:
    return LocalPair(tiny_models.target_hf, tiny_models.drafter_onnx, dtype="fp32")


def spec_for(prompt: list[int], params: SamplingParams, max_new: int, session_id: str = "ray") -> cloud_pb2.SessionSpec:
    sampling = common_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        sampling.seed = params.seed
    return cloud_pb2.SessionSpec(session_id=session_id, prompt_tokens=prompt, sampling=sampling,
                                 max_new_tokens=max_new)


def speculative(client: CloudVerifierClient, pair: LocalPair, prompt: list[int], params: SamplingParams,
                max_new: int, draft_len: int = 4, after_round=None) -> list[int]:  # type: ignore[no-untyped-def]
    """The edge's loop: draft locally, verify over gRPC; `after_round(n)` runs after round n."""
    drafter = pair.drafter.new_session(prompt, params, params.seed or 0,
                                       max_length=len(prompt) + max_new + draft_len + 2)
    client.open(spec_for(prompt, params, max_new))
    n = 0
    while True:
        k = min(draft_len, max_new - len(client.generated) - 1)
        draft = drafter.draft(k) if k > 0 else Draft((), None)
        verdict = client.verify(draft_round(n, draft.tokens, draft.q))
        if verdict.finished:
            return list(client.generated)
        drafter.commit(verdict.accepted, verdict.tokens)
        if after_round is not None:
            after_round(n)
        n += 1


def test_health_and_reflection_through_the_serve_proxy(cloud: Cloud) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(cloud.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                          timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_greedy_over_ray_equals_target_generate(cloud: Cloud, pair: LocalPair) -> None:
    with CloudVerifierClient(cloud.address, round_timeout_s=30) as client:
        for prompt in PROMPTS:
            expected = pair.target_generate(prompt, GREEDY, max_new_tokens=40).tokens
            assert tuple(speculative(client, pair, prompt, GREEDY, 40)) == expected
        tag = client.opened.replica
        assert client.resumes == 0
    assert tag and not LEAK.search(tag) and "SERVE_REPLICA" not in tag and "pid" not in tag
    assert cloud.replica_pid(tag) in {p.pid for p in cloud.descendants()}


def test_cloud_only_generate_over_ray(cloud: Cloud, pair: LocalPair) -> None:
    with CloudVerifierClient(cloud.address) as client:
        got = [t for r in client.generate(spec_for(PROMPTS[0], GREEDY, 25)) for t in r.tokens]
    assert tuple(got) == pair.target_generate(PROMPTS[0], GREEDY, max_new_tokens=25).tokens


def test_seeded_sampling_over_ray_is_reproducible(cloud: Cloud, pair: LocalPair) -> None:
    runs = []
    for _ in range(2):
        with CloudVerifierClient(cloud.address, round_timeout_s=30) as client:
            runs.append(speculative(client, pair, PROMPTS[0], SAMPLED, 30))
    assert runs[0] == runs[1]
    assert tuple(runs[0]) == pair.speculative_generate(PROMPTS[0], SAMPLED, draft_len=4, max_new_tokens=30).tokens


def test_bad_input_over_ray_is_invalid_argument_and_serving_continues(cloud: Cloud, pair: LocalPair) -> None:
    open_ = cloud_pb2.VerifyRequest(open=spec_for(PROMPTS[0], GREEDY, 10))
    sampled_open = cloud_pb2.VerifyRequest(open=spec_for(PROMPTS[0], SAMPLED, 10))
    nan_row = cloud_pb2.DraftRound(draft_tokens=[5], q_rows=[common_pb2.SparseDist(ids=[5], probs=[float("nan")])])
    cases = {
        "round before open": [cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(draft_tokens=[5]))],
        "max_draft_len": [open_, cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(draft_tokens=[5] * 17))],
        "q_rows[0]": [sampled_open, cloud_pb2.VerifyRequest(round=nan_row)],
        "top_p": [cloud_pb2.VerifyRequest(open=cloud_pb2.SessionSpec(prompt_tokens=[5], max_new_tokens=5,
                                                                     sampling=common_pb2.SamplingParams(top_p=2)))],
    }
    with grpc.insecure_channel(cloud.address) as channel:
        stub = cloud_pb2_grpc.CloudVerifierStub(channel)
        for needle, requests in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Verify(iter(requests), timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (needle, info.value.details())
            assert needle.split()[0] in info.value.details(), info.value.details()
    with CloudVerifierClient(cloud.address, round_timeout_s=30) as client:
        expected = pair.target_generate(PROMPTS[1], GREEDY, max_new_tokens=15).tokens
        assert tuple(speculative(client, pair, PROMPTS[1], GREEDY, 15)) == expected


def test_concurrent_sessions_over_ray_do_not_mix(cloud: Cloud, pair: LocalPair) -> None:
    expected = [pair.target_generate(p, GREEDY, max_new_tokens=30).tokens for p in PROMPTS[:2]]
    results: dict[int, tuple[int, ...]] = {}

    def run(i: int) -> None:
        with CloudVerifierClient(cloud.address, round_timeout_s=60) as client:
            results[i] = tuple(speculative(client, pair, PROMPTS[i], GREEDY, 30, draft_len=3 + i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert [results.get(0), results.get(1)] == expected


def test_session_limit_over_ray_gives_resource_exhausted(cloud: Cloud) -> None:
    clients, codes = [], []
    try:
        for i in range(REPLICAS * MAX_SESSIONS + 1):
            client = CloudVerifierClient(cloud.address, open_timeout_s=30)
            clients.append(client)
            try:
                client.open(spec_for(PROMPTS[0], GREEDY, 10, session_id=f"limit{i}"))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                assert "max_sessions" in exc.details()
    finally:
        for client in clients:
            client.close()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_cancelled_streams_close_their_sessions_on_the_replica(cloud: Cloud) -> None:
    with grpc.insecure_channel(cloud.address) as channel:
        stub = cloud_pb2_grpc.CloudVerifierStub(channel)
        call = stub.Generate(
            cloud_pb2.GenerateRequest(session=spec_for(PROMPTS[0], GREEDY, 60, session_id="cancel-gen")), timeout=30)
        next(call)
        call.cancel()
        for i in range(4):  # cancelled while the session opens (the replica may or may not have opened it)
            call = stub.Generate(cloud_pb2.GenerateRequest(
                session=spec_for(PROMPTS[2], GREEDY, 60, session_id=f"cancel-open{i}")), timeout=30)
            time.sleep(0.05 * i)
            call.cancel()
    with CloudVerifierClient(cloud.address) as client:  # leaving the block cancels the stream
        client.open(spec_for(PROMPTS[0], GREEDY, 30, session_id="cancel-verify"))
        client.verify(draft_round(0, [5]))
    deadline = time.monotonic() + 20  # replica logs reach the CLI's stderr through Ray's log monitor
    while time.monotonic() < deadline:
        text = cloud.log.read_text()
        opened = set(re.findall(r"opened (cancel-open\d#\d+)", text))
        if "closed cancel-gen#" in text and "closed cancel-verify#" in text and all(
                f"closed {key}" in text for key in opened):
            return
        time.sleep(0.2)
    pytest.fail("a cancelled stream left its session open:\n" + "\n".join(
        line for line in cloud.log.read_text().splitlines() if "cancel-" in line))


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_killing_the_serving_replica_mid_answer_resumes_identically(cloud: Cloud, pair: LocalPair, params: SamplingParams,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    time.sleep(0.5)  # let the previous test's closed streams leave the replicas
    with CloudVerifierClient(cloud.address, round_timeout_s=60) as client:
        undisturbed = speculative(client, pair, PROMPTS[2], params, 40)
    killed: list[int] = []

    def kill_serving_replica(n: int) -> None:
        if n != 2:
            return
        pid = cloud.replica_pid(client.opened.replica)
        assert pid in {p.pid for p in cloud.descendants()}  # a process of this test's cluster
        os.kill(pid, signal.SIGKILL)
        psutil.wait_procs([p for p in cloud.descendants() if p.pid == pid], timeout=30)
        killed.append(pid)

    with CloudVerifierClient(cloud.address, round_timeout_s=60, open_timeout_s=60, max_resumes=10,
                             backoff_s=0.5) as client:
        resumed = speculative(client, pair, PROMPTS[2], params, 40, after_round=kill_serving_replica)
        assert killed and client.resumes >= 1
        assert cloud.replica_pid(client.opened.replica) != killed[0]
    assert resumed == undisturbed
    broke = [r.getMessage() for r in caplog.records if "cloud stream broke" in r.getMessage()]
    assert broke and not any(LEAK.search(m) or str(killed[0]) in m for m in broke), broke


def test_fuzzing_through_the_serve_proxy_gets_documented_statuses(cloud: Cloud) -> None:
    with grpc.insecure_channel(cloud.address) as channel:
        for raw in (b"\xff\xff\xff", bad_utf8_example()):
            for reply in (send_verify(channel, [raw], None), send_generate(channel, raw, None)):
                assert reply.code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in reply.details, reply
                check_reply(reply)
        tried = {"Verify": 0, "Generate": 0}

        @settings(FUZZ, max_examples=RAY_FUZZ_EXAMPLES)
        @given(verify_streams(), generate_calls())
        def prop(stream: tuple[list[bytes], int | None], call: tuple[bytes, int | None]) -> None:
            tried["Verify"] += 1
            check_reply(send_verify(channel, *stream))
            tried["Generate"] += 1
            check_reply(send_generate(channel, *call))

        prop()
        print(f"ray fuzz: {tried}")
    with CloudVerifierClient(cloud.address, round_timeout_s=30) as client:
        client.open(spec_for(PROMPTS[1], GREEDY, 5))
        assert len(client.verify(draft_round(0, [5])).tokens) >= 1


def test_answers_reaching_the_context_end_with_length_over_ray(cloud: Cloud, pair: LocalPair) -> None:
    prompt = [(7 * i) % 500 + 3 for i in range(CONTEXT - 10)]
    expected = pair.target_generate(prompt, GREEDY, max_new_tokens=10).tokens
    with CloudVerifierClient(cloud.address, round_timeout_s=60) as client:
        client.open(spec_for(prompt, GREEDY, 64))
        verdict = client.verify(draft_round(0, [5] * 8))
        while not verdict.finished:
            verdict = client.verify(draft_round(1, [5] * 8))  # drafts past the context are cut, not refused
        assert verdict.finish_reason == common_pb2.FINISH_REASON_LENGTH and tuple(client.generated) == expected
        replies = list(client.generate(spec_for(prompt, GREEDY, 64)))
    assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert tuple(t for r in replies for t in r.tokens) == expected


def test_sigterm_drains_then_exits_zero_and_leaves_nothing(cloud: Cloud) -> None:
    assert cloud.descendants(), "the cluster's processes should be children of the CLI"
    channel = grpc.insecure_channel(cloud.address)
    requests: queue.Queue[object] = queue.Queue()
    live = cloud_pb2_grpc.CloudVerifierStub(channel).Verify(iter(requests.get, None), timeout=120)
    requests.put(cloud_pb2.VerifyRequest(open=spec_for(PROMPTS[0], GREEDY, 30, session_id="at-sigterm")))
    assert next(live).WhichOneof("kind") == "opened"
    cloud.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as ended:
        next(live)  # the idle stream is ended by the drain, not left to the shutdown
    requests.put(None)
    channel.close()
    print(f"ray drain: the live stream ended {time.monotonic() - t0:.1f}s after SIGTERM: "
          f"{ended.value.code().name} {ended.value.details()}")
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and not LEAK.search(ended.value.details() or "")
    assert "draining" in (ended.value.details() or "")
    assert cloud.stop() == 0
    assert "draining" in cloud.log.read_text()
    assert "cloud grpc=" not in cloud.log.read_text()  # the ready line goes to stdout only
