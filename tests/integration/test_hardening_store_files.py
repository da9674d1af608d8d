"""The personal store's files are private: its folder 0700 when the store creates it (or it is the
default folder), and store.sqlite3, -wal and -shm 0600, under the usual umask 022; an existing file
more open than that is narrowed with a warning; a folder the caller chose that already exists
(like /tmp) keeps its mode. Real SQLite files and the real all-MiniLM-L6-v2 embedder on CPU.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.embedder import Embedder, default_embedder
from orchestrator.store import PersonalStore, default_store_path

NOTE = "My cat Miso's vet is Dr. Alvarez at the Riverside Animal Clinic on Elm Street."


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return default_embedder()


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _db_files(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


def test_a_new_store_is_private_to_its_user(embedder: Embedder, tmp_path: Path) -> None:
    db = tmp_path / "personal" / "store.sqlite3"
    parent_mode = _mode(tmp_path)
    with PersonalStore(db, embedder) as store:
        store.add("vet", NOTE)
        files = _db_files(db)
        assert all(f.exists() for f in files)  # WAL and SHM exist while the store is open
        assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
        assert _mode(db.parent) == 0o700
    assert _mode(tmp_path) == parent_mode  # only the folder the store made is narrowed


def test_an_existing_folder_the_caller_chose_keeps_its_mode(embedder: Embedder, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    db = shared / "store.sqlite3"
    with PersonalStore(db, embedder) as store:
        store.add("vet", NOTE)
        assert _mode(shared) == 0o1777
        assert [_mode(f) for f in _db_files(db)] == [0o600] * 3


def test_an_existing_open_store_is_narrowed_with_a_warning(
        embedder: Embedder, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "store.sqlite3"
    PersonalStore(db, embedder).close()
    db.chmod(0o644)
    legacy = sqlite3.connect(db)  # keeps -wal and -shm, as another process would
    legacy.execute("PRAGMA journal_mode = WAL")
    legacy.execute("CREATE TABLE IF NOT EXISTS scratch (x)")
    for f in _db_files(db)[1:]:
        f.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="orchestrator.store"), PersonalStore(db, embedder) as store:
        store.add("vet", NOTE)
        assert [_mode(f) for f in _db_files(db)] == [0o600] * 3
    legacy.close()
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(db) in warned and "644" in warned and "600" in warned


def test_the_default_folder_is_narrowed_even_when_it_exists(
        embedder: Embedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    db = default_store_path()
    db.parent.mkdir(parents=True)
    db.parent.chmod(0o755)
    with PersonalStore(db, embedder) as store:
        store.add("vet", NOTE)
    assert _mode(db.parent) == 0o700 and _mode(db) == 0o600
