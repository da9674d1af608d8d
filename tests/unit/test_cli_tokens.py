"""`tandem tokens`: a bad --out or --max-sessions exits 2 with one line and leaves no live token;
without --store it manages the local stack's store; list and revoke never create a store.

The CLI runs in this process (`tandem.cli.main.main`) against a store in a temporary folder
(TANDEM_HOME points at one too).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tandem.security
from cloud_node.tokens import TokenStore
from tandem.cli.main import main


def _tokens(store: Path, *argv: str) -> int:
    return main(["tokens", "--store", str(store), *argv])


def _live(store: Path) -> list[str]:
    return [r.name for r in TokenStore(store).records() if r.revoked is None]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""  # no token shown
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("out", ["/proc/x.token", "/sys/x.token"])
def test_an_unwritable_out_path_exits_2_naming_it_and_issues_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str) -> None:
    store = tmp_path / "tokens.json"
    assert _tokens(store, "issue", "phone", "--out", out) == 2
    line = _one_error_line(capsys)
    assert line.startswith("tandem tokens: error: ") and out in line
    assert _live(store) == []


def test_a_missing_out_folder_is_refused_not_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, out = tmp_path / "tokens.json", tmp_path / "no" / "such" / "x.token"
    assert _tokens(store, "issue", "phone", "--out", str(out)) == 2
    line = _one_error_line(capsys)
    assert str(out.parent) in line and "does not exist" in line
    assert not (tmp_path / "no").exists() and _live(store) == []


def test_an_out_path_that_is_a_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "tokens.json"
    assert _tokens(store, "issue", "phone", "--out", str(tmp_path)) == 2
    assert str(tmp_path) in _one_error_line(capsys) and _live(store) == []


def test_a_write_that_fails_after_the_checks_revokes_the_token(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(path: Path, text: str) -> Path:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(tandem.security, "write_secret", full_disk)
    store, out = tmp_path / "tokens.json", tmp_path / "x.token"
    assert _tokens(store, "issue", "phone", "--out", str(out)) == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "No space left on device" in line and "revoked" in line
    assert _live(store) == [] and not out.exists()
    assert [r.name for r in TokenStore(store).records()] == ["phone"]  # kept, revoked: the id stays traceable


def test_a_good_out_path_gets_the_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, out = tmp_path / "tokens.json", tmp_path / "x.token"
    assert _tokens(store, "issue", "phone", "--out", str(out)) == 0
    assert out.read_text().startswith("tdm_") and (out.stat().st_mode & 0o777) == 0o600
    assert capsys.readouterr().out == "" and _live(store) == ["phone"]


@pytest.mark.parametrize("value", ["0", "-1", "1025"])
def test_a_max_sessions_out_of_range_exits_2_naming_the_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    store = tmp_path / "tokens.json"
    assert _tokens(store, "issue", "phone", "--max-sessions", value) == 2
    line = _one_error_line(capsys)
    assert "--max-sessions" in line and value in line and _live(store) == []


def test_max_sessions_defaults_to_4_and_keeps_what_is_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "tokens.json"
    assert _tokens(store, "issue", "phone") == 0
    assert _tokens(store, "issue", "tablet", "--max-sessions", "1") == 0
    capsys.readouterr()
    assert _tokens(store, "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["max_sessions"] for r in rows} == {"phone": 4, "tablet": 1}


def test_the_default_store_is_the_one_the_local_stack_runs_with(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.ops import local_stack

    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    stack = local_stack.prepare_secrets()  # what `tandem up` runs the cloud with
    assert main(["tokens", "issue", "phone"]) == 0
    assert "phone" in _live(stack.cloud_tokens)  # the running stack accepts it
    assert main(["tokens", "revoke", local_stack.EDGE_DEVICE_NAME]) == 0
    assert local_stack.EDGE_DEVICE_NAME not in _live(stack.cloud_tokens)  # and revoke reaches it


def test_tokens_help_names_the_local_stacks_store(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["tokens", "--help"])
    assert "TANDEM_HOME/secure/cloud-tokens.json" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("op", [["list"], ["list", "--json"], ["revoke", "phone"]])
def test_list_and_revoke_of_a_missing_store_exit_2_and_create_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], op: list[str]) -> None:
    store = tmp_path / "typo" / "tokens.json"
    assert _tokens(store, *op) == 2
    assert _one_error_line(capsys) == f"tandem tokens: error: no token store at {store}"
    assert list(tmp_path.iterdir()) == []


def test_issue_into_a_missing_store_folder_exits_2_and_creates_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "typo" / "tokens.json"
    assert _tokens(store, "issue", "phone") == 2
    assert str(tmp_path / "typo") in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_issue_makes_a_store_in_an_existing_folder_that_list_then_reads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "tokens.json"
    assert _tokens(store, "issue", "phone") == 0
    capsys.readouterr()
    assert _tokens(store, "list") == 0
    assert "phone" in capsys.readouterr().out
