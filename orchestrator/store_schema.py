"""The personal store's SQLite schema, its migrations and its consistency checks.

Guarantees:
- A new store is created as version 1 (`SCHEMA_V1`), then brought up to `SCHEMA_VERSION` by the
  same migrations an existing store runs, so old and new stores end with one schema.
- `migrate` runs inside the caller's write transaction (BEGIN IMMEDIATE), reads
  `PRAGMA user_version` there and applies each missing step once: two processes opening an old
  store together migrate it once. A store newer than this code raises `RuntimeError`.
- Version 2 adds `idempotency_key` (unique when set) and `request_sha256` to documents, and an
  index on (created_unix_ms, id), the listing order. Rows written before keep NULL keys.
- `find_problems` lists every inconsistency in words (empty when there is none); a damaged file
  that makes a check fail is reported, not raised.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_VERSION = 2

SCHEMA_V1 = (
    """CREATE TABLE documents (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('document', 'note', 'profile')),
        privacy TEXT NOT NULL CHECK (privacy IN ('private', 'shareable')),
        source TEXT NOT NULL DEFAULT '',
        bytes INTEGER NOT NULL,
        created_unix_ms INTEGER NOT NULL,
        chunk_count INTEGER NOT NULL)""",
    """CREATE TABLE chunks (
        id INTEGER PRIMARY KEY,
        doc_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        text TEXT NOT NULL,
        embedding BLOB NOT NULL,
        UNIQUE (doc_id, idx))""",
    "CREATE VIRTUAL TABLE chunks_fts USING fts5(text, tokenize = 'porter unicode61')",
    # Cascaded deletes fire these too, so the FTS rows follow the chunks in every transaction.
    """CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
        INSERT INTO chunks_fts (rowid, text) VALUES (new.id, new.text); END""",
    """CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
        DELETE FROM chunks_fts WHERE rowid = old.id; END""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

# MIGRATIONS[v] takes a store from version v to v + 1.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE documents ADD COLUMN idempotency_key TEXT",
        "ALTER TABLE documents ADD COLUMN request_sha256 TEXT",
        "CREATE UNIQUE INDEX documents_idempotency ON documents (idempotency_key) "
        "WHERE idempotency_key IS NOT NULL",
        "CREATE INDEX documents_order ON documents (created_unix_ms, id)"),
}


def create(conn: sqlite3.Connection, embedder_name: str, dim: int) -> None:
    """The version-1 tables and the embedder's metadata (then `migrate` to the current one)."""
    for statement in SCHEMA_V1:
        conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('embedder', ?), ('dim', ?)", (embedder_name, str(dim)))
    conn.execute("PRAGMA user_version = 1")


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Apply the missing migrations, inside the caller's transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"{path}: schema version {version}, this code reads up to {SCHEMA_VERSION}")
    while version < SCHEMA_VERSION:
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
        version += 1
        conn.execute(f"PRAGMA user_version = {version}")


def require_fts5(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("CREATE VIRTUAL TABLE temp.fts5_probe USING fts5(x)")
        conn.execute("DROP TABLE temp.fts5_probe")
    except sqlite3.OperationalError as err:
        raise RuntimeError(f"this Python's SQLite ({sqlite3.sqlite_version}) lacks FTS5, "
                           "which the personal store needs for keyword search") from err


_CHECKS = (  # (problem template, query whose rows fill it)
    ("document {} has chunk_count {} but {} chunk rows",
     ("SELECT d.id, d.chunk_count, count(c.id) FROM documents d LEFT JOIN chunks c "
      "ON c.doc_id = d.id GROUP BY d.id HAVING d.chunk_count != count(c.id)")),
    ("document {} has chunk indexes {}..{}, not 0..chunk_count-1",
     ("SELECT doc_id, min(idx), max(idx) FROM chunks GROUP BY doc_id "
      "HAVING min(idx) != 0 OR max(idx) != count(*) - 1")),
    ("chunk {} belongs to missing document {}",
     ("SELECT c.id, c.doc_id FROM chunks c LEFT JOIN documents d ON d.id = c.doc_id "
      "WHERE d.id IS NULL")),
    ("chunk {} has no FTS row or a different FTS text",
     ("SELECT c.id FROM chunks c LEFT JOIN chunks_fts f ON f.rowid = c.id "
      "WHERE f.rowid IS NULL OR f.text IS NOT c.text")),
    ("FTS row {} has no chunk",
     "SELECT f.rowid FROM chunks_fts f LEFT JOIN chunks c ON c.id = f.rowid WHERE c.id IS NULL"),
)


def find_problems(conn: sqlite3.Connection, dim: int) -> list[str]:
    problems = [p for p in _found(conn, "sqlite: {}", "PRAGMA quick_check") if p != "sqlite: ok"]
    for template, sql in _CHECKS:
        problems += _found(conn, template, sql)
    problems += _found(conn, "chunk {} has an embedding of {} bytes, expected {}",
                       "SELECT id, length(embedding), ? FROM chunks WHERE length(embedding) != ?", (4 * dim,) * 2)
    try:
        conn.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('integrity-check')")
    except sqlite3.DatabaseError as err:
        problems.append(f"FTS index: {err}")
    return problems


def _found(conn: sqlite3.Connection, template: str, sql: str, params: tuple[int, ...] = ()) -> list[str]:
    """`template` filled by each row of `sql`; a check that a damaged file stops is a problem too."""
    try:
        return [template.format(*row) for row in conn.execute(sql, params)]
    except sqlite3.DatabaseError as err:
        return [f"sqlite: {err} (running: {sql[:80]})"]
