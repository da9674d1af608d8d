"""The shaper's pure parts: condition validation, the delay model, address parsing, the CLI's
flag checking. No sockets, milliseconds."""

from __future__ import annotations

import random

import pytest

from netshape.__main__ import main
from netshape.shaper import DelayLine, LinkConditions, Serializer, format_address, parse_address, piece_size


@pytest.mark.parametrize("field, value", [
    ("rtt_ms", -1), ("jitter_ms", float("nan")), ("bandwidth_kbps", float("inf")),
    ("rtt_ms", "20"), ("jitter_ms", True), ("mode", "sideways"),
])
def test_invalid_conditions_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        LinkConditions(**{field: value})  # type: ignore[arg-type]


def test_rtt_gives_half_each_way() -> None:
    line = DelayLine(Serializer(), random.Random(0))
    at = line.schedule(100, now=10.0, conditions=LinkConditions(rtt_ms=200))
    assert at == pytest.approx(10.1)


def test_jitter_never_negative_never_reorders() -> None:
    line = DelayLine(Serializer(), random.Random(7))
    conditions = LinkConditions(rtt_ms=2, jitter_ms=50)  # jitter far above rtt/2
    now, last = 0.0, 0.0
    for _ in range(2000):
        now += 0.001
        at = line.schedule(10, now, conditions)
        assert at >= now and at >= last
        last = at


def test_bandwidth_serializes_and_is_shared_by_connections() -> None:
    link = Serializer()
    a, b = DelayLine(link, random.Random(0)), DelayLine(link, random.Random(0))
    conditions = LinkConditions(bandwidth_kbps=8)  # 1000 bytes/s
    assert a.schedule(500, 0.0, conditions) == pytest.approx(0.5)
    assert b.schedule(500, 0.0, conditions) == pytest.approx(1.0)  # queued behind a's bytes
    assert link.backlog(0.25) == pytest.approx(0.75)
    assert a.schedule(100, 5.0, conditions) == pytest.approx(5.1)  # an idle link starts afresh


def test_piece_size_bounds() -> None:
    assert piece_size(0) == 64 * 1024
    assert piece_size(8) == 1024
    assert piece_size(8000) == 20_000  # 20 ms of 1 MB/s
    assert piece_size(10**9) == 64 * 1024


def test_addresses_round_trip() -> None:
    assert parse_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert parse_address("[::1]:80") == ("::1", 80)
    assert format_address(("::1", 80)) == "[::1]:80"
    for bad in ("nohost", ":80", "host:", "host:99999", "host:x", "host:\u00b2", "host:\u0663"):
        with pytest.raises(ValueError):
            parse_address(bad)


@pytest.mark.parametrize("argv", [
    ["--upstream", "nohost"],
    ["--upstream", "127.0.0.1:1", "--rtt-ms", "-5"],
    ["--upstream", "127.0.0.1:1", "--bandwidth-kbps", "fast"],
    ["--upstream", "127.0.0.1:1", "--control", "10.0.0.1:0"],
    ["--listen", "127.0.0.1:0"],
])
def test_cli_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
