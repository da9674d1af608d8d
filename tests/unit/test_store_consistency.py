"""`check_consistency` finds each kind of damage it claims to, naming it; the store pins its
durability settings.

A store of three documents (a hash embedder, no model) is closed, then damaged on purpose through
a plain sqlite3 connection (foreign keys off, as any other program would open it) or by
overwriting bytes of the file. Reopened without a model, `check_consistency` must report exactly
the damage done, with the row it concerns, and never raise: a store damaged at the page level
reports SQLite's own words. The control: the undamaged store reports nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.store import PersonalStore
from tests.support.ingest_worker import HashEmbedder, document_text

DIM = 16
PAGE = 4096


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "store.sqlite3"
    with PersonalStore(path, HashEmbedder(DIM)) as store:
        for i in range(3):
            store.add(f"doc {i}", document_text(i, 3))
        assert store.check_consistency() == []
    assert not Path(f"{path}-wal").exists()  # checkpointed: every page is in the file itself
    return path


class Target:
    """Doc 1's id and its chunks' ids, read from the undamaged store."""

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.doc = raw.execute("SELECT id FROM documents WHERE title = 'doc 1'").fetchone()[0]
        self.chunks = [r[0] for r in raw.execute("SELECT id FROM chunks WHERE doc_id = ? ORDER BY idx", (self.doc,))]
        assert len(self.chunks) >= 3


def _sql(statement: str, *params: object) -> Callable[[sqlite3.Connection, Target], object]:
    """A damage done by one statement; params may be functions of the target (its ids)."""
    return lambda raw, t: raw.execute(statement, [p(t) if callable(p) else p for p in params])


DAMAGES: dict[str, tuple[Callable[[sqlite3.Connection, Target], object], Callable[[Target], list[str]]]] = {
    "fts-row-deleted": (_sql("DELETE FROM chunks_fts WHERE rowid = ?", lambda t: t.chunks[1]),
                        lambda t: [f"chunk {t.chunks[1]} has no FTS row or a different FTS text"]),
    "fts-text-changed": (_sql("UPDATE chunks_fts SET text = 'other words' WHERE rowid = ?", lambda t: t.chunks[0]),
                         lambda t: [f"chunk {t.chunks[0]} has no FTS row or a different FTS text"]),
    "fts-row-without-chunk": (_sql("INSERT INTO chunks_fts (rowid, text) VALUES (9999, 'stray words')"),
                              lambda t: ["FTS row 9999 has no chunk"]),
    "orphan-chunk": (_sql("INSERT INTO chunks (id, doc_id, idx, text, embedding) VALUES "
                          "(7777, 'ghost', 0, 'orphan words', zeroblob(?))", 4 * DIM),
                     lambda t: ["chunk 7777 belongs to missing document ghost"]),
    "chunk-row-deleted": (_sql("DELETE FROM chunks WHERE id = ?", lambda t: t.chunks[-1]),
                          lambda t: [f"document {t.doc} has chunk_count {len(t.chunks)} but "
                                     f"{len(t.chunks) - 1} chunk rows"]),
    "chunk-indexes-shifted": (_sql("UPDATE chunks SET idx = idx + 5 WHERE doc_id = ?", lambda t: t.doc),
                              lambda t: [f"document {t.doc} has chunk indexes 5..{len(t.chunks) + 4}, "
                                         "not 0..chunk_count-1"]),
    "embedding-cut": (_sql("UPDATE chunks SET embedding = substr(embedding, 1, 5) WHERE id = ?", lambda t: t.chunks[2]),
                      lambda t: [f"chunk {t.chunks[2]} has an embedding of 5 bytes, expected {4 * DIM}"]),
    "fts-index-segment-zeroed": (_sql("UPDATE chunks_fts_data SET block = zeroblob(length(block)) WHERE id > 10"),
                                 lambda t: ["FTS index: database disk image is malformed"]),
}


@pytest.mark.parametrize("name", DAMAGES)
def test_check_consistency_names_each_damage(path: Path, name: str) -> None:
    damage, expected = DAMAGES[name]
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        target = Target(raw)
        damage(raw, target)
    finally:
        raw.close()
    with PersonalStore(path, None) as store:
        assert store.check_consistency() == expected(target)


def _overwrite(path: Path, page: int, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek((page - 1) * PAGE + offset)
        f.write(data)


@pytest.mark.parametrize("btree", ["chunks", "documents_order"])
def test_a_damaged_page_is_reported_not_raised(path: Path, btree: str) -> None:
    """The page's cell count is set to 80: SQLite finds the page malformed. On the table's root,
    its own quick_check and the checks' queries fail with an error; `check_consistency` lists those
    errors instead of raising them (before the fix it raised DatabaseError)."""
    raw = sqlite3.connect(path)
    try:
        root = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (btree,)).fetchone()[0]
        assert raw.execute("PRAGMA page_size").fetchone()[0] == PAGE
    finally:
        raw.close()
    _overwrite(path, root, 3, (80).to_bytes(2, "big"))
    with PersonalStore(path, None) as store:
        problems = store.check_consistency()
    assert problems and all(p.startswith("sqlite: ") for p in problems), problems
    assert any(str(root) in p or "malformed" in p for p in problems), problems


@pytest.mark.parametrize("embedder", [HashEmbedder(DIM), None], ids=["with-model", "without-model"])
def test_the_store_connection_is_wal_with_synchronous_full(path: Path, embedder: HashEmbedder | None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """synchronous=FULL: a commit the API reported survives power loss, not only a crash."""
    opened: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def capture(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(connect(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(sqlite3, "connect", capture)
    with PersonalStore(path, embedder):
        (conn,) = opened
        pragmas = [conn.execute(f"PRAGMA {name}").fetchone()[0] for name in ("synchronous", "journal_mode", "foreign_keys")]
        assert pragmas == [2, "wal", 1]  # 2 is FULL
