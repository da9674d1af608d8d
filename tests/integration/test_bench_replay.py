"""The cloud-scale replay load against an in-process cloud verifier (tiny models, no Ray).

A session recorded with the real edge code (`scale_edge.run_job`) replays to the same tokens
from light clients; a recording the cloud does not follow is stopped and counted as diverged,
not failed; a recording file is reused only under the same settings.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cloud_node.verifier import VerifierCore
from edge_node.drafter import DrafterModel
from tandem.bench.replay import from_run, load_recording, recording_key, replay_many, replay_session, save_recording
from tandem.bench.scale import summarize
from tandem.bench.scale_edge import run_job
from tests.support.cloud_server import serving

PROMPT = [5, 17, 99, 3, 44, 101, 7]
N = 24


@pytest.fixture(scope="module")
def cloud(tiny_models) -> Iterator[str]:
    with serving(VerifierCore.load(tiny_models.target_hf, dtype="fp32")) as address:
        yield address


@pytest.fixture(scope="module")
def recording(tiny_models, cloud: str) -> dict:
    drafter = DrafterModel(tiny_models.drafter_onnx)
    with grpc.insecure_channel(cloud) as channel:
        result = run_job(drafter, channel, {"id": "p", "prompt_ids": PROMPT, "max_new_tokens": N, "draft_len": 4,
                                            "record": True})
    return from_run(result, N)


def test_the_recording_holds_every_round_as_sent(recording: dict) -> None:
    rounds = recording["rounds"]
    assert [t for r in rounds for t in r["tokens"]] == recording["tokens"] and len(recording["tokens"]) == N
    assert all(len(r["drafts"]) <= 4 for r in rounds) and len(rounds[0]["drafts"]) == 4
    assert rounds[-1]["finished"] and not any(r["finished"] for r in rounds[:-1])
    # the perturbed drafter is rejected somewhere: those drafts are kept as they were sent
    assert any(r["tokens"][: len(r["drafts"])] != r["drafts"] for r in rounds)


def test_replayed_sessions_follow_their_solo_run(cloud: str, recording: dict) -> None:
    results = replay_many(cloud, [("p", recording)] * 3)
    for r in results:
        assert r["error"] is None and not r["diverged"] and not r["rejected"]
        assert r["tokens"] == recording["tokens"]
        assert len(r["round_ms"]) == len(r["batch_sessions"]) == len(recording["rounds"])
        assert r["end"] >= r["start"] and r["replica"]
    row = summarize("replay", 1, results, {"p": recording["tokens"]})
    assert (row["completed"], row["rejected"], row["failed"], row["diverged"], row["identical"]) == (3, 0, 0, 0, True)
    assert row["agg_tok_s"] > 0 and row["verify_p50_ms"] is not None and row["open_p50_ms"] is not None


def test_a_session_that_diverges_is_stopped_and_counted(cloud: str, recording: dict) -> None:
    wrong = copy.deepcopy(recording)
    wrong["rounds"][1]["tokens"] = [t + 1 for t in wrong["rounds"][1]["tokens"]]
    bad = replay_session(cloud, wrong, session_id="bad", prompt="p")
    assert bad["diverged"] and bad["diverged_at"] == 2 and bad["error"] is None
    assert len(bad["round_ms"]) == 2  # stopped at the round that differed
    good = replay_session(cloud, recording, session_id="good", prompt="p")
    row = summarize("replay", 1, [bad, good], {"p": recording["tokens"]})
    assert (row["completed"], row["failed"], row["diverged"], row["identical"]) == (1, 0, 1, False)


def test_a_recording_file_is_reused_only_under_the_same_settings(tmp_path: Path, recording: dict) -> None:
    path = tmp_path / "replay.json"
    key = recording_key(Path("t"), Path("d"), "fp32", 4, N)
    save_recording(path, key, {"p": recording})
    assert load_recording(path, key, [("p", PROMPT)]) == {"p": recording}
    assert load_recording(path, key | {"draft_len": 3}, [("p", PROMPT)]) == {}
    assert load_recording(path, key, [("p", PROMPT + [1])]) == {}  # the prompt changed
    assert load_recording(tmp_path / "absent.json", key, [("p", PROMPT)]) == {}
    save_recording(path, key, {"q": recording})  # adds to the prompts recorded under the same key
    assert set(load_recording(path, key, [("p", PROMPT), ("q", PROMPT)])) == {"p", "q"}
    save_recording(path, key | {"dtype": "bf16"}, {"q": recording})  # other settings: starts over
    assert load_recording(path, key, [("p", PROMPT)]) == {}
