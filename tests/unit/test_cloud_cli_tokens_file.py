"""`tandem serve cloud` and `python -m cloud_node gateway` with --tokens-file: a store that does not
exist exits 2 with one line naming it, before Ray or the gateway starts; an existing store with no
live token starts, with a warning that no device can connect.

Neither Ray nor a gateway starts here: `serve_until` and `gateway.build` are replaced by stubs that
record the call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

import cloud_node.cli
import cloud_node.gateway
from cloud_node.tokens import TokenStore
from tandem.cli.main import main as tandem_main


class Started(Exception):
    """What the stubs raise: something would have started."""


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture()
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def serve_until(*_: Any, **__: Any) -> int:
        calls.append("cloud")
        return 0

    def build(*_: Any, **__: Any) -> Any:
        calls.append("gateway")
        raise Started

    monkeypatch.setattr(cloud_node.cli, "serve_until", serve_until)
    monkeypatch.setattr(cloud_node.gateway, "build", build)
    monkeypatch.setattr(cloud_node.cli.signal, "signal", lambda *_: None)  # keep pytest's handlers
    return calls


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_serve_cloud_with_a_missing_tokens_file_exits_2_naming_it_before_anything_starts(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], started: list[str]) -> None:
    missing = tmp_path / "nonexistent.json"
    assert tandem_main(["serve", "cloud", "--model-dir", str(model_dir), "--tokens-file", str(missing)]) == 2
    line = _one_line(capsys)
    assert line.startswith("tandem serve: error: tokens_file: no token store at ") and str(missing) in line
    assert started == [] and not missing.exists()


def test_gateway_with_a_missing_tokens_file_exits_2_naming_it_before_it_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], started: list[str]) -> None:
    missing = tmp_path / "nonexistent.json"
    assert cloud_node.cli.main(["gateway", "--upstream", "127.0.0.1:1", "--tokens-file", str(missing)]) == 2
    line = _one_line(capsys)
    assert line.startswith("cloud: error: tokens_file: no token store at ") and str(missing) in line
    assert started == []


def test_serve_cloud_with_a_store_of_no_live_token_starts_and_warns(
        model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, started: list[str]) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    store.issue("phone")
    store.revoke("phone")
    with caplog.at_level(logging.WARNING), pytest.raises(Started):
        tandem_main(["serve", "cloud", "--model-dir", str(model_dir), "--tokens-file", str(store.path)])
    assert started == ["gateway"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no device can connect" in warnings[0] and str(store.path) in warnings[0]


def test_serve_cloud_with_a_live_token_starts_without_a_warning(
        model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, started: list[str]) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    store.issue("phone")
    with caplog.at_level(logging.WARNING), pytest.raises(Started):
        tandem_main(["serve", "cloud", "--model-dir", str(model_dir), "--tokens-file", str(store.path)])
    assert started == ["gateway"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
