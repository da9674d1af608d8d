"""The cloud's token store refuses a file that another local user could have changed (group- or
world-writable, or owned by neither this user nor root): the gateway does not start (exit 2, one
line naming the file), and a running gateway's `TokenChecker` keeps its last good copy and logs an
error, so nobody can un-revoke a token by editing `revoked` back to null.

Real store files, a real `python -m cloud_node gateway` process (it would listen on 127.0.0.1:0
if it started), and the real `TokenChecker` reloading with `reload_s=0`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_node.tokens import TokenChecker, TokenError, TokenStore, Verdict, load_records

REPO = Path(__file__).resolve().parents[2]


def _rewrite_in_place(path: Path, edit: dict[str, object]) -> None:
    """What another user with write access does: new content, same inode and mode."""
    data = json.loads(path.read_text())
    for item in data["tokens"]:
        item.update(edit)
    with open(path, "r+") as handle:
        handle.truncate(0)
        handle.write(json.dumps(data))


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666], ids=lambda mode: f"{mode:o}")
def test_a_writable_store_stops_the_gateway_with_exit_2_naming_it(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "cloud-tokens.json"
    TokenStore(path).issue("edge-1")
    path.chmod(mode)
    argv = [sys.executable, "-m", "cloud_node", "gateway", "--upstream", "127.0.0.1:1", "--host", "127.0.0.1",
            "--port", "0", "--tokens-file", str(path)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the gateway started with a token store other users may change")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert str(path) in lines[0] and f"mode {mode:o}" in lines[0] and "chmod 600" in lines[0]


def test_a_store_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    path = tmp_path / "cloud-tokens.json"
    TokenStore(path).issue("edge-1")
    os.chown(path, 54321, -1)
    with pytest.raises(TokenError, match="uid 54321"):
        load_records(path)
    os.chown(path, 0, -1)  # root-owned (a mounted Kubernetes Secret is): accepted
    assert len(load_records(path)) == 1


def test_a_read_only_root_or_group_readable_store_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "cloud-tokens.json"
    TokenStore(path).issue("edge-1")
    path.chmod(0o440)  # a Kubernetes Secret with defaultMode 288 and fsGroup
    assert len(load_records(path)) == 1


def test_a_running_gateway_keeps_the_revocation_when_the_store_is_made_writable_and_edited(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cloud-tokens.json"
    store = TokenStore(path)
    _, token = store.issue("edge-1")
    checker = TokenChecker(path, reload_s=0.0)
    assert checker.check(token)[0] is Verdict.VALID
    store.revoke("edge-1")
    assert checker.check(token)[0] is Verdict.REVOKED
    path.chmod(0o666)
    _rewrite_in_place(path, {"revoked": None})
    with caplog.at_level(logging.ERROR, logger="cloud_node.tokens"):
        assert checker.check(token)[0] is Verdict.REVOKED
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(path) in errors[0] and "keeping the last good copy" in errors[0]
    assert "mode 666" in errors[0] and token not in errors[0]


def test_a_refused_store_is_read_again_once_its_mode_is_fixed(tmp_path: Path) -> None:
    path, other = tmp_path / "cloud-tokens.json", tmp_path / "other.json"
    _, first = TokenStore(path).issue("edge-1")
    checker = TokenChecker(path, reload_s=0.0)
    _, second = TokenStore(other).issue("edge-2")
    merged = json.loads(path.read_text())
    merged["tokens"] += json.loads(other.read_text())["tokens"]
    path.chmod(0o664)
    path.write_text(json.dumps(merged))
    assert checker.check(second)[0] is Verdict.UNKNOWN  # refused: the last good copy has only edge-1
    assert checker.check(first)[0] is Verdict.VALID
    path.chmod(0o600)  # only the mode changes: the checker must notice
    assert checker.check(second)[0] is Verdict.VALID
