"""`tandem up` (and `tandem demo`'s --link-rtt-ms): a --link-rtt-ms that is negative, nan or inf,
or a --draft-len or port out of range, exits 2 with one line naming the flag, before any secret
is made or any process starts.

The CLI runs in this process; the models check, the secrets and the launch are stubs that record
that something would start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import tandem.models.registry
from tandem.cli.main import main
from tandem.ops import local_stack
from tests.support.start_stubs import Started, starter


@pytest.fixture()
def started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    calls: list[str] = []

    def stub(what: str) -> Any:
        return starter(calls, what)

    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    monkeypatch.setattr(tandem.models.registry, "require_pair", lambda: None)
    monkeypatch.setattr(local_stack, "secrets_for", stub("secrets"))
    monkeypatch.setattr(local_stack, "launch", stub("launch"))
    monkeypatch.setattr("tandem.cli.stack.signal.signal", lambda *_: None)  # keep pytest's handlers
    return calls


@pytest.mark.parametrize(("flag", "value"), [
    ("--link-rtt-ms", "nan"), ("--link-rtt-ms", "inf"), ("--link-rtt-ms", "-inf"), ("--link-rtt-ms", "-1"),
    ("--draft-len", "0"), ("--draft-len", "17"), ("--port", "-1"), ("--http-port", "70000"),
    ("--edge-metrics-port", "65536"), ("--cloud-metrics-port", "-2"),
])
def test_up_with_a_bad_flag_exits_2_naming_it_before_anything_starts(
        capsys: pytest.CaptureFixture[str], started: list[str], flag: str, value: str) -> None:
    assert main(["up", f"{flag}={value}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tandem up: error: ") and flag in lines[0], lines
    assert started == []


def test_up_with_good_flags_goes_on_to_make_the_secrets(started: list[str]) -> None:
    with pytest.raises(Started):
        main(["up", "--link-rtt-ms", "50", "--draft-len", "4", "--port", "0"])
    assert started == ["secrets"]


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_demo_with_a_bad_link_rtt_exits_2_naming_it_before_anything_starts(
        capsys: pytest.CaptureFixture[str], started: list[str], value: str) -> None:
    assert main(["demo", f"--link-rtt-ms={value}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tandem demo: error: ") and "--link-rtt-ms" in lines[0], lines
    assert started == []
