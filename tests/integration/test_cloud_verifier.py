"""The cloud verifier over gRPC (plain grpcio server on port 0, tiny fp32 target, ONNX drafter).

Checks: greedy over gRPC equals target-only decoding; seeded sampling is reproducible and equals
the in-process loop; resume with generated tokens continues identically; every bad input gets
INVALID_ARGUMENT naming its field while the server keeps serving; sessions in parallel threads
do not mix; the session limit gives RESOURCE_EXHAUSTED; evicted caches are re-prefilled without
changing the output; health and reflection answer.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from cloud_node.servicer import SERVICE_NAME
from cloud_node.verifier import Limits, VerifierCore
from protos.tandem.v1 import cloud_pb2, cloud_pb2_grpc, common_pb2
from tandem.pair import LocalPair
from tandem_core.loop import Draft
from tandem_core.sampling import SamplingParams
from tests.support.cloud_client import CloudVerifierClient, draft_round
from tests.support.cloud_server import serving

PROMPTS = [[5, 17, 99, 3, 44], [300], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=7)
LIMITS = Limits(max_sessions=4, max_context=200, max_draft_len=8, max_new_tokens=64)


def spec_for(prompt: list[int], params: SamplingParams, max_new: int, generated: list[int] = (),
             session_id: str = "t") -> cloud_pb2.SessionSpec:
    sampling = common_pb2.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        sampling.seed = params.seed
    return cloud_pb2.SessionSpec(session_id=session_id, prompt_tokens=prompt, sampling=sampling,
                                 max_new_tokens=max_new, generated_tokens=list(generated))


def speculative(client: CloudVerifierClient, pair: LocalPair, spec: cloud_pb2.SessionSpec,
                draft_len: int = 4, counts: list[int] | None = None) -> list[int]:
    """The edge's loop, minimal: draft locally, verify remotely, commit the verdict.
    `counts`, when given, accumulates [drafted, accepted]."""
    params = SamplingParams(spec.sampling.temperature, spec.sampling.top_k, spec.sampling.top_p,
                            spec.sampling.seed if spec.sampling.HasField("seed") else None)
    context = [*spec.prompt_tokens, *spec.generated_tokens]
    drafter = pair.drafter.new_session(context, params, params.seed or 0,
                                       max_length=len(context) + spec.max_new_tokens + draft_len + 2)
    client.open(spec)
    round_no = 0
    while True:
        k = min(draft_len, spec.max_new_tokens - len(client.generated) - 1)
        draft = drafter.draft(k) if k > 0 else Draft((), None)
        verdict = client.verify(draft_round(round_no, draft.tokens, draft.q))
        if counts is not None:
            counts[0] += len(draft.tokens)
            counts[1] += verdict.accepted
        if verdict.finished:
            return list(client.generated)
        drafter.commit(verdict.accepted, verdict.tokens)
        round_no += 1


@pytest.fixture(scope="module")
def pair(tiny_models) -> LocalPair:
    return LocalPair(tiny_models.target_hf, tiny_models.drafter_onnx, dtype="fp32")


@pytest.fixture(scope="module")
def core(tiny_models) -> VerifierCore:
    return VerifierCore.load(tiny_models.target_hf, dtype="fp32", limits=LIMITS, model_name="tiny")


def _serve(core: VerifierCore) -> Iterator[str]:
    with serving(core) as address:
        yield address


@pytest.fixture(scope="module")
def address(core: VerifierCore) -> Iterator[str]:
    yield from _serve(core)


@pytest.fixture()
def client(address: str) -> Iterator[CloudVerifierClient]:
    with CloudVerifierClient(address, round_timeout_s=30) as c:
        yield c


def wait_for_no_sessions(core: VerifierCore, timeout_s: float = 5.0) -> None:
    """Closed streams free their sessions asynchronously (server side)."""
    deadline = time.monotonic() + timeout_s
    while len(core.store) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(core.store) == 0, core.store.keys()


def test_greedy_over_grpc_equals_target_generate(pair: LocalPair, client: CloudVerifierClient) -> None:
    counts = [0, 0]
    for prompt in PROMPTS:
        expected = pair.target_generate(prompt, GREEDY, max_new_tokens=40).tokens
        assert tuple(speculative(client, pair, spec_for(prompt, GREEDY, 40), counts=counts)) == expected
    assert 0 < counts[1] < counts[0]  # both full and partial acceptance were exercised
    assert client.opened is not None and client.opened.model == "tiny"
    assert client.bytes_up > 0 and client.bytes_down > 0


def test_sampling_with_seed_is_reproducible_and_equals_in_process(pair: LocalPair, address: str) -> None:
    for prompt in PROMPTS[:2]:
        runs = []
        for _ in range(2):
            with CloudVerifierClient(address) as c:
                runs.append(speculative(c, pair, spec_for(prompt, SAMPLED, 30)))
        assert runs[0] == runs[1]
        local = pair.speculative_generate(prompt, SAMPLED, draft_len=4, max_new_tokens=30,
                                         tree_nodes=0)  # the client above sends chains
        assert tuple(runs[0]) == local.tokens


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_resume_with_generated_tokens_continues_identically(pair: LocalPair, address: str,
                                                           params: SamplingParams) -> None:
    prompt = PROMPTS[0]
    with CloudVerifierClient(address) as c:
        full = speculative(c, pair, spec_for(prompt, params, 30))
    half = full[: len(full) // 2]
    with CloudVerifierClient(address) as c:
        assert speculative(c, pair, spec_for(prompt, params, 30, generated=half)) == full


def test_cloud_only_generate(pair: LocalPair, client: CloudVerifierClient) -> None:
    prompt = PROMPTS[0]
    got = [t for r in client.generate(spec_for(prompt, GREEDY, 25)) for t in r.tokens]
    assert tuple(got) == pair.target_generate(prompt, GREEDY, max_new_tokens=25).tokens
    sampled = [[t for r in client.generate(spec_for(prompt, SAMPLED, 20)) for t in r.tokens] for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]) >= 1


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_open_with_first_round_answers_the_first_token_before_any_round(pair: LocalPair, address: str,
                                                                          params: SamplingParams) -> None:
    """SessionSpec.first_round: SessionOpened, then round 1's verdict (no drafts): the cloud-only
    route's first token; a round ahead tagged on it is verified or dropped as its guess says."""
    prompt, first_of = PROMPTS[2], None
    with grpc.insecure_channel(address) as channel:
        stub = cloud_pb2_grpc.CloudVerifierStub(channel)
        for _ in range(2):
            spec = spec_for(prompt, params, 10)
            spec.first_round = True
            expected = [t for r in CloudVerifierClient(address, channel=channel).generate(spec_for(prompt, params, 10))
                        for t in r.tokens][0]
            first_of = expected if first_of is None else first_of
            wrong = expected + 1
            requests = [cloud_pb2.VerifyRequest(open=spec),
                        cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(
                            round=2, assume_position=len(prompt) + 1, assume_token=wrong)),
                        cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(
                            round=3, assume_position=len(prompt) + 1, assume_token=expected)),
                        # an assumption past the context can never hold: dropped, not refused
                        cloud_pb2.VerifyRequest(round=cloud_pb2.DraftRound(
                            round=4, assume_position=LIMITS.max_context + 3, assume_token=1))]
            replies = list(stub.Verify(iter(requests), timeout=60))
            assert [r.WhichOneof("kind") for r in replies] == ["opened"] + ["verdict"] * 4
            first, dropped, kept, past = (r.verdict for r in replies[1:])
            assert (past.round, past.dropped, list(past.tokens)) == (4, True, [])
            assert (first.round, first.accepted, list(first.tokens)) == (1, 0, [expected])
            assert (dropped.round, dropped.dropped, list(dropped.tokens)) == (2, True, [])
            assert kept.round == 3 and not kept.dropped and len(kept.tokens) == 1
    assert first_of == expected  # the same first token every time (seeded when sampled)


def test_cancelled_streams_free_their_sessions(address: str, core: VerifierCore) -> None:
    wait_for_no_sessions(core)
    with grpc.insecure_channel(address) as channel:
        stub = cloud_pb2_grpc.CloudVerifierStub(channel)
        call = stub.Generate(cloud_pb2.GenerateRequest(session=spec_for(PROMPTS[0], GREEDY, 60)), timeout=30)
        next(call)
        call.cancel()
        with CloudVerifierClient(address) as c:
            c.open(spec_for(PROMPTS[0], GREEDY, 10))
            c.verify(draft_round(0, [5]))
        # the client closes mid-answer (the context manager cancels the stream)
    wait_for_no_sessions(core)


def _rpc(stub: cloud_pb2_grpc.CloudVerifierStub, *requests: cloud_pb2.VerifyRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Verify(iter(requests), timeout=30))
    return info.value


def _open(**kw) -> cloud_pb2.VerifyRequest:
    spec = spec_for(PROMPTS[0], GREEDY, 10)
    sampling = kw.pop("sampling", None)
    if sampling is not None:
        spec.sampling.CopyFrom(sampling)
    for name, value in kw.items():
        if isinstance(value, list):
            getattr(spec, name)[:] = value
        else:
            setattr(spec, name, value)
    return cloud_pb2.VerifyRequest(open=spec)


def _round(tokens: list[int], rows: list[tuple[list[int], list[float]]] = ()) -> cloud_pb2.VerifyRequest:
    r = cloud_pb2.DraftRound(round=0, draft_tokens=tokens)
    for ids, probs in rows:
        r.q_rows.append(common_pb2.SparseDist(ids=ids, probs=probs))
    return cloud_pb2.VerifyRequest(round=r)


def _sampling(temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=1)


SAMPLING_OPEN = _open(sampling=_sampling())
BAD_INPUTS = {
    "prompt_outside_vocab": ([_open(prompt_tokens=[5, 512])], "prompt_tokens"),
    "empty_prompt": ([_open(prompt_tokens=[])], "prompt_tokens"),
    "negative_temperature": ([_open(sampling=_sampling(temperature=-0.5))], "temperature"),
    "nan_temperature": ([_open(sampling=_sampling(temperature=math.nan))], "temperature"),
    "top_p_zero": ([_open(sampling=_sampling(top_p=0.0))], "top_p"),
    "top_p_above_one": ([_open(sampling=_sampling(top_p=1.5))], "top_p"),
    "max_new_tokens_zero": ([_open(max_new_tokens=0)], "max_new_tokens"),
    "max_new_tokens_over_limit": ([_open(max_new_tokens=65)], "max_new_tokens"),
    "prompt_past_context": ([_open(prompt_tokens=[5] * 200)], "max_context"),
    "unknown_model": ([_open(model="gpt-9")], "model"),
    "generated_outside_vocab": ([_open(generated_tokens=[-1])], "generated_tokens"),
    "round_before_open": ([_round([5])], "before"),
    "empty_request": ([cloud_pb2.VerifyRequest()], "request"),
    "draft_outside_vocab": ([_open(), _round([5, 600])], "draft_tokens"),
    "too_many_drafts": ([_open(), _round([5] * 17)], "max_draft_len"),
    "q_rows_in_greedy": ([_open(), _round([5], [([5], [1.0])])], "q_rows"),
    "q_rows_missing": ([SAMPLING_OPEN, _round([5, 6], [([5], [1.0])])], "q_rows"),
    "q_nan": ([SAMPLING_OPEN, _round([5], [([5, 6], [math.nan, 0.5])])], "q_rows[0]"),
    "q_negative": ([SAMPLING_OPEN, _round([5], [([5, 6], [1.5, -0.5])])], "q_rows[0]"),
    "q_not_normalized": ([SAMPLING_OPEN, _round([5], [([5, 6], [0.5, 0.2])])], "sum to 1"),
    "q_id_outside_vocab": ([SAMPLING_OPEN, _round([5], [([5, 9999], [0.5, 0.5])])], "q_rows[0]"),
    "q_draft_has_zero_mass": ([SAMPLING_OPEN, _round([5], [([6], [1.0])])], "probability 0"),
    "second_open": ([_open(), _open()], "open"),
}


def test_every_bad_input_is_invalid_argument_and_the_server_keeps_serving(
        pair: LocalPair, address: str, core: VerifierCore) -> None:
    stub = cloud_pb2_grpc.CloudVerifierStub(grpc.insecure_channel(address))
    for name, (requests, needle) in BAD_INPUTS.items():
        err = _rpc(stub, *requests)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.code(), err.details())
        assert needle in err.details(), (name, err.details())
    gen_err = pytest.raises(grpc.RpcError, lambda: list(stub.Generate(cloud_pb2.GenerateRequest(
        session=spec_for([], GREEDY, 5)), timeout=30)))
    assert gen_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wait_for_no_sessions(core)  # failed streams leak nothing
    with CloudVerifierClient(address) as c:
        expected = pair.target_generate(PROMPTS[1], GREEDY, max_new_tokens=20).tokens
        assert tuple(speculative(c, pair, spec_for(PROMPTS[1], GREEDY, 20))) == expected


def test_concurrent_sessions_do_not_mix(pair: LocalPair, address: str) -> None:
    expected = [pair.target_generate(p, GREEDY, max_new_tokens=30).tokens for p in PROMPTS]
    results: dict[int, tuple[int, ...]] = {}

    def run(i: int) -> None:
        with CloudVerifierClient(address, round_timeout_s=60) as c:
            results[i] = tuple(speculative(c, pair, spec_for(PROMPTS[i], GREEDY, 30, session_id=f"s{i}"),
                                           draft_len=2 + i))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(len(PROMPTS))] == expected


def test_session_limit_gives_resource_exhausted(address: str, core: VerifierCore) -> None:
    wait_for_no_sessions(core)
    clients = [CloudVerifierClient(address) for _ in range(LIMITS.max_sessions)]
    try:
        for c in clients:
            c.open(spec_for(PROMPTS[0], GREEDY, 10))
        with CloudVerifierClient(address) as extra, pytest.raises(grpc.RpcError) as info:
            extra.open(spec_for(PROMPTS[0], GREEDY, 10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions" in info.value.details()
    finally:
        for c in clients:
            c.close()
    wait_for_no_sessions(core)
    with CloudVerifierClient(address) as c:
        assert c.open(spec_for(PROMPTS[0], GREEDY, 10)).prompt_len == len(PROMPTS[0])


def test_evicted_caches_are_reprefilled_and_output_is_unchanged(pair: LocalPair, core: VerifierCore) -> None:
    # A budget that admits both prompts (5 + 10 tokens, plus one round of 1 draft each) but not
    # their growth: after a few rounds every round of one session evicts the other's cache.
    bpt = core.store.bytes_per_token
    small = VerifierCore(core.target, eos_ids=core.eos_ids, limits=Limits(kv_budget_bytes=19 * bpt, max_draft_len=1),
                         bytes_per_token=bpt)
    for address in _serve(small):
        a, b = CloudVerifierClient(address), CloudVerifierClient(address)
        a.open(spec_for(PROMPTS[0], GREEDY, 20, session_id="a"))
        b.open(spec_for(PROMPTS[2], GREEDY, 20, session_id="b"))
        prefills = 0
        while not (a.finished and b.finished):  # interleave one-token rounds (no drafts)
            for c in (a, b):
                if not c.finished:
                    prefills += c.verify(draft_round(0, [])).timing.prefill_ms > 0
        assert prefills >= 25  # re-prefilled nearly every round
        for c, prompt in ((a, PROMPTS[0]), (b, PROMPTS[2])):
            assert tuple(c.generated) == pair.target_generate(prompt, GREEDY, max_new_tokens=20).tokens
            c.close()


def test_health_and_reflection(address: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                        timeout=10)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    channel.close()


def test_bf16_every_path_gives_the_cloud_only_tokens(tiny_models) -> None:
    """The lossless claim in bf16, where the pass's shape changes the rounding unless the engine is
    batch-invariant: speculative over gRPC (several draft lengths, alone and concurrently, and
    resumed) and in process, and cloud-only over gRPC, all equal the in-process cloud-only path."""
    pair16 = LocalPair(tiny_models.target_hf, tiny_models.drafter_onnx, dtype="bf16")
    core16 = VerifierCore.load(tiny_models.target_hf, dtype="bf16", limits=LIMITS, model_name="tiny")
    prompts = [*PROMPTS, [11, 250, 3, 3, 3, 97, 41, 12, 8]]
    reference = [pair16.cloud_only_generate(p, GREEDY, max_new_tokens=36).tokens for p in prompts]
    for address in _serve(core16):
        for k in (1, 3, 7):
            with CloudVerifierClient(address, round_timeout_s=60) as c:
                assert [tuple(speculative(c, pair16, spec_for(p, GREEDY, 36), draft_len=k)) for p in prompts] == reference
        assert [pair16.speculative_generate(p, GREEDY, draft_len=5, max_new_tokens=36).tokens
                for p in prompts] == reference
        with CloudVerifierClient(address, round_timeout_s=60) as c:
            assert [tuple(t for r in c.generate(spec_for(p, GREEDY, 36)) for t in r.tokens) for p in prompts] == reference
        results: dict[int, tuple[int, ...]] = {}

        def run(i: int, address: str = address, results: dict[int, tuple[int, ...]] = results) -> None:
            with CloudVerifierClient(address, round_timeout_s=60) as c:
                results[i] = tuple(speculative(c, pair16, spec_for(prompts[i], GREEDY, 36, session_id=f"b{i}"),
                                               draft_len=1 + 2 * i))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [results.get(i) for i in range(len(prompts))] == reference
        for p, full in zip(prompts, reference, strict=True):  # resumed after a third of the answer
            cut = list(full[: len(full) // 3])
            with CloudVerifierClient(address, round_timeout_s=60) as c:
                assert cut + speculative(c, pair16, spec_for(p, GREEDY, 36, generated=cut))[len(cut):] == list(full)
    core16.target.close()


IDLE_S = 0.5


def test_a_silent_stream_is_closed_at_the_idle_limit_and_frees_its_session(core: VerifierCore) -> None:
    """A client that opens a session and then sends nothing would hold a session slot forever:
    the stream ends with UNAVAILABLE (resume on a new stream) once it has been silent for
    `Limits.idle_s`, counted from the last reply; a stream that keeps sending is never cut."""
    from cloud_node import metrics

    bpt = core.store.bytes_per_token
    quiet = VerifierCore(core.target, eos_ids=core.eos_ids, limits=Limits(idle_s=IDLE_S), bytes_per_token=bpt)
    for address in _serve(quiet):
        with grpc.insecure_channel(address) as channel:
            requests: queue.Queue[cloud_pb2.VerifyRequest | None] = queue.Queue()
            requests.put(cloud_pb2.VerifyRequest(open=spec_for(PROMPTS[0], GREEDY, 60)))
            call = cloud_pb2_grpc.CloudVerifierStub(channel).Verify(iter(requests.get, None), timeout=30)
            assert next(call).WhichOneof("kind") == "opened"
            for n in range(4):  # rounds spaced by 0.6 x the limit: more than the limit in all
                time.sleep(0.6 * IDLE_S)
                requests.put(cloud_pb2.VerifyRequest(round=draft_round(n, [])))
                assert next(call).WhichOneof("kind") == "verdict"
            silent = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                next(call)
            took = time.monotonic() - silent
            requests.put(None)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "no request for" in info.value.details()
        assert IDLE_S <= took <= IDLE_S + 1.0
        wait_for_no_sessions(quiet)
        assert metrics.registry().get_sample_value("tandem_cloud_active_sessions") == 0
