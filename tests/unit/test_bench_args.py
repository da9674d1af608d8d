"""`tandem bench`: a numeric flag that is out of range, negative, nan or inf exits 2 with one line
naming it, for every suite, before any model loads or any cluster or process starts.

The CLI runs in this process with each suite's first step replaced by a stub that records that
something would start; one case runs `tandem bench` as a subprocess with a short timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tandem.bench.chat_turns
import tandem.bench.fallback
import tandem.bench.main
import tandem.bench.orchestrator
import tandem.bench.scale
from tandem.cli.main import main
from tests.support.start_stubs import Started, starter


@pytest.fixture()
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def stub(what: str) -> Any:
        return starter(calls, what)

    monkeypatch.setattr(tandem.bench.scale, "bench_models", stub("cloud-scale"))
    monkeypatch.setattr(tandem.bench.fallback, "run_suite", stub("fallback"))
    monkeypatch.setattr(tandem.bench.chat_turns, "run_suite", stub("chat-turns"))
    monkeypatch.setattr(tandem.bench.orchestrator, "run_suite", stub("orchestrator"))
    monkeypatch.setattr(tandem.bench.main, "_model_dirs", stub("methods"))
    monkeypatch.setattr(tandem.bench.scale.signal, "signal", lambda *_: None)  # keep pytest's SIGTERM handler
    return calls


BAD = [
    ("cloud-scale", "--max-sessions", "0"), ("cloud-scale", "--max-sessions", "-3"),
    ("cloud-scale", "--duration", "-5"), ("cloud-scale", "--duration", "nan"), ("cloud-scale", "--duration", "inf"),
    ("fallback", "--temperature", "nan"), ("methods", "--temperature", "inf"), ("chat-turns", "--temperature", "-1"),
    ("chat-turns", "--seed", "-1"), ("fallback", "--seed", str(2**63)),
    ("methods", "--rtt-ms", "nan"), ("methods", "--rtt-ms", "20,inf"), ("fallback", "--rtt-ms", "-1"),
    ("orchestrator", "--repeats", "0"), ("fallback", "--repeats", "-1"),
    ("methods", "--limit", "0"), ("methods", "--handshake-repeats", "0"), ("methods", "--warmup-tokens", "-1"),
    ("chat-turns", "--max-new-tokens", "0"), ("chat-turns", "--draft-len", "-1"), ("methods", "--draft-len", "17"),
    ("cloud-scale", "--sessions", "0"), ("cloud-scale", "--replicas", "3"),
]


@pytest.mark.parametrize(("suite", "flag", "value"), BAD)
def test_a_bad_numeric_flag_exits_2_naming_it_before_anything_starts(
        capsys: pytest.CaptureFixture[str], started: list[str], suite: str, flag: str, value: str) -> None:
    assert main(["bench", "--suite", suite, f"{flag}={value}"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("tandem bench: error: ") and flag in lines[0]
    assert started == [] and captured.out == ""


@pytest.mark.parametrize("argv", [
    ["--suite", "cloud-scale", "--max-sessions", "1", "--duration", "0"], ["--suite", "cloud-scale", "--duration", "2.5"],
    ["--suite", "fallback", "--temperature", "0.7"], ["--suite", "chat-turns", "--seed", "0"],
    ["--suite", "orchestrator", "--repeats", "1"], ["--rtt-ms", "0,20", "--temperature", "0.5", "--seed", "7"],
])
def test_good_flags_reach_the_suite(started: list[str], argv: list[str]) -> None:
    with pytest.raises(Started):
        main(["bench", *argv])
    assert len(started) == 1


def test_cli_refuses_max_sessions_0_in_one_line_without_starting_a_cluster(tmp_path: Path) -> None:
    env = dict(os.environ, TANDEM_HOME=str(tmp_path))
    entry = "import sys; from tandem.cli.main import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", entry, "bench", "--suite", "cloud-scale", "--max-sessions", "0"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["tandem bench: error: --max-sessions: must be >= 1, got 0"]
    assert done.stdout == "" and list(tmp_path.iterdir()) == []
