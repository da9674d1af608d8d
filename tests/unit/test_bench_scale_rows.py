"""cloud-scale rows: what counts as completed, rejected, failed and diverged, the mean sessions per
pass when the cloud reports it, and the retry hint read from a RESOURCE_EXHAUSTED status."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2

from tandem.bench.replay import retry_hint_ms
from tandem.bench.scale import format_table, summarize


class _Refusal(grpc.RpcError):
    def __init__(self, trailers: tuple[tuple[str, object], ...]) -> None:
        self._trailers = trailers

    def trailing_metadata(self) -> tuple[tuple[str, object], ...]:
        return self._trailers


def _details(*details: object) -> bytes:
    status_pb2 = pytest.importorskip("google.rpc.status_pb2")
    packed = []
    for detail in details:
        wrapper = any_pb2.Any()
        wrapper.Pack(detail)
        packed.append(wrapper)
    return status_pb2.Status(code=8, message="full", details=packed).SerializeToString()


def test_the_retry_hint_comes_from_retry_info_or_a_trailer() -> None:
    # google.rpc (googleapis-common-protos) comes with the cloud extra's dependencies
    error_details_pb2 = pytest.importorskip("google.rpc.error_details_pb2")
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000))
    other = error_details_pb2.ErrorInfo(reason="KV_BUDGET")
    assert retry_hint_ms(_Refusal((("grpc-status-details-bin", _details(other, retry)),))) == 1500
    assert retry_hint_ms(_Refusal((("retry-after-ms", "250"),))) == 250.0
    assert retry_hint_ms(_Refusal((("grpc-status-details-bin", _details(other)),))) is None
    assert retry_hint_ms(_Refusal((("grpc-status-details-bin", b"\xff not a status"),))) is None
    assert retry_hint_ms(_Refusal(())) is None


def _session(prompt: str, tokens: list[int], start: float, end: float, **extra: object) -> dict:
    return {"prompt": prompt, "tokens": tokens, "start": start, "end": end, "round_ms": [100.0, 10.0, 20.0],
            "replica": "r1", "rejected": False, "error": None, "batch_sessions": [0, 0], **extra}


def test_a_row_counts_each_outcome_once() -> None:
    results = [
        _session("a", [1, 2, 3, 4], 0.0, 2.0, batch_sessions=[2, 3], server_ms=[90.0, 4.0, 6.0]),
        _session("b", [5, 6], 0.5, 1.0, server_ms=[80.0, 8.0, 8.0]),
        _session("a", [], 0.1, 0.2, rejected=True, error="RESOURCE_EXHAUSTED: full", retry_hint_ms=800.0),
        _session("b", [], 0.1, 0.3, error="UNAVAILABLE: gone"),
        _session("a", [1, 9], 0.1, 0.4, diverged=True, diverged_at=1),
    ]
    row = summarize("replay", 1, results, {"a": [1, 2, 3, 4]})
    assert (row["sessions"], row["completed"], row["rejected"], row["failed"], row["diverged"]) == (5, 2, 1, 1, 1)
    assert row["verified_tokens"] == 6 and row["agg_tok_s"] == pytest.approx(3.0)
    assert row["batch_sessions_mean"] == pytest.approx(2.5)  # zeros: the cloud did not report it
    assert row["retry_hint_ms"] == 800.0
    assert row["open_p50_ms"] == 100.0 and row["verify_p50_ms"] == pytest.approx(15.0)
    # the open round is left out; the path is each round's own remainder (6, 12, 2, 14 ms)
    assert row["server_p50_ms"] == pytest.approx(7.0) and row["path_p50_ms"] == pytest.approx(9.0)
    assert row["identical"] is False  # one diverged
    assert "replay" in format_table([row])


def test_without_reports_the_optional_fields_are_none() -> None:
    row = summarize("edges", 2, [_session("a", [1, 2], 0.0, 1.0)], {})
    assert row["batch_sessions_mean"] is None and row["retry_hint_ms"] is None
    assert row["server_p50_ms"] is None and row["path_p50_ms"] is None  # the edges load times no split
    assert row["identical"] is True and row["sessions_per_replica"] == [1]
    assert " - " in format_table([row])
