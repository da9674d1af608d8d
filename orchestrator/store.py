"""The user's personal documents on the device: SQLite rows, chunk vectors and a keyword index.

Guarantees:
- One SQLite file (default `default_store_path()`), WAL journal, foreign keys on, schema version
  in `PRAGMA user_version`. `synchronous=FULL`: in WAL mode NORMAL survives a crashed process
  but may lose the last commits on power loss, and a document the API reported as added must
  still be there after the phone's battery dies; adds are rare and embedding them costs far
  more than one fsync.
- `add` chunks and embeds everything first, then writes the document row, its chunks (text and
  float32 vector) and their FTS5 rows in ONE transaction: after a crash at any point the
  document is fully present or absent. `delete` removes the row; chunks go by ON DELETE CASCADE
  and their FTS rows by trigger, in the same transaction.
- Bad input raises `InvalidField` (a `ValueError` and an `orchestrator.errors.BadRequest`) whose
  message starts with the field's name; an unknown id in `set_privacy` raises `NotFound`.
- `PersonalStore(path, None)` opens an existing store without loading a model (list, get,
  delete, set_privacy, count, check_consistency), e.g. for a CLI or a check after a crash.
- Thread safety: one connection shared by all threads, every use under one lock. Embedding (the
  slow part of `add`) runs outside the lock, so searches are not blocked by an ingest. Other
  processes may use the same file (WAL, busy timeout); their commits are noticed through
  `PRAGMA data_version` and refresh the vector cache.
- Vectors are kept in memory as one (n_chunks, dim) float32 matrix, rebuilt lazily after any
  write, so vector search is one matmul. That costs 4*dim bytes per chunk (1.5 KB for MiniLM):
  fine up to a few tens of thousands of chunks (tens of MB); beyond that use an ANN index.
- The FTS5 table keeps its own copy of each chunk's text (a regular FTS5 table, not external
  content), so `check_consistency` can compare it row by row with `chunks`.
- Metrics (`orchestrator.metrics`, counts only): the documents and chunks this connection sees
  (counted at open, then moved by its own adds and deletes, with no extra statement in `add`),
  and each search (`nearest`).
- Idempotency: `add(..., idempotency_key=k)` with a key already stored returns that document
  and stores nothing (checked before embedding, and again inside the write transaction, so two
  concurrent adds with one key store one document); the same key with a different title, text,
  kind, privacy or source raises `Conflict`. Schema and migrations: `store_schema`.
- Bounded reads: `page` and `chunks` read titles and sources cut to the API's limits in SQL
  (`truncated` says so), so rows written before the limits existed, however large, never make a
  listing or a citation grow.
- Private on disk: the database file is created with mode 0600 before SQLite opens it (SQLite
  gives `-wal` and `-shm` the main file's mode), and an existing one, `-wal` or `-shm` more open
  than that is narrowed to 0600 with a warning. The store's folder is made 0700 when the store
  creates it, or when it is the default folder (`default_store_path`); a folder the caller chose
  that already exists (e.g. /tmp) keeps its mode.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self

import numpy as np

from orchestrator import metrics, store_schema
from orchestrator.errors import BadRequest, Conflict, NotFound, shown
from orchestrator.retrieval import chunk_text
from orchestrator.validation import MAX_DOCUMENT_BYTES, MAX_SOURCE_CHARS, MAX_TITLE_CHARS

logger = logging.getLogger(__name__)

SCHEMA_VERSION = store_schema.SCHEMA_VERSION
KINDS = ("document", "note", "profile")
PRIVACIES = ("private", "shareable")
__all__ = ["MAX_DOCUMENT_BYTES", "MAX_TITLE_CHARS", "DocumentInfo", "InvalidField", "PersonalStore"]


class InvalidField(BadRequest, ValueError):
    """Bad input to the store; `field` names it and the message starts with it."""


class EmbedderLike(Protocol):
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class DocumentInfo:
    id: str
    title: str
    kind: str  # one of KINDS
    privacy: str  # one of PRIVACIES
    source: str  # where it came from, e.g. a file path; may be ""
    bytes: int  # UTF-8 size of the text
    created_unix_ms: int
    chunk_count: int
    truncated: bool = False  # title or source cut to its limit (`page` only)


@dataclass(frozen=True)
class ChunkRecord:
    """One stored chunk with its document's current title and privacy label."""

    chunk_id: int  # the row id in `chunks` (also the FTS rowid)
    doc_id: str
    title: str
    chunk_index: int  # position inside its document, from 0
    text: str
    privacy: str


def default_store_path() -> Path:
    from tandem.paths import tandem_home

    return tandem_home() / "personal" / "store.sqlite3"


def _make_private(path: Path) -> None:
    """The store's folder 0700 (when the store creates it or it is the default one) and its
    database files 0600, before SQLite opens them; see the module's docstring."""
    folder = path.parent
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if created or folder.resolve() == default_store_path().parent:
        _narrow(folder, 0o700)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.chmod(path, 0o600)  # exactly, whatever the umask
    except FileExistsError:
        pass  # an existing store, or one another process has just created: narrowed below
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        _narrow(file, 0o600)


def _narrow(path: Path, mode: int) -> None:
    """chmod `path` to `mode` if others than its owner may use it, with a warning."""
    try:
        old = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return  # -wal and -shm come and go with other processes' connections
    if not old & ~mode:
        return
    try:
        path.chmod(mode)
        logger.warning("%s was mode %o, open to other users; narrowed it to %o", path, old, mode)
    except OSError as exc:
        logger.warning("%s is mode %o, open to other users, and cannot be narrowed to %o: %s", path, old, mode,
                       exc.strerror)


class PersonalStore:
    """Documents, chunks, vectors and keyword index in one SQLite file."""

    def __init__(self, path: Path, embedder: EmbedderLike | None) -> None:
        """Open or create the store; `embedder=None` opens an existing one without a model,
        for listing, deleting, relabelling and checking (adding and searching then raise)."""
        self.path = Path(path)
        self._embedder = embedder
        _make_private(self.path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                     timeout=10.0)
        self._cache: tuple[np.ndarray, np.ndarray] | None = None  # (matrix, chunk ids)
        self._cache_key: tuple[int, int] | None = None
        self._writes = 0  # our own commits; data_version only counts other connections'
        with self._lock:
            self._setup()
            self.dim = self._check_embedder()
            counts = self._conn.execute("SELECT count(*), coalesce(sum(chunk_count), 0) FROM documents").fetchone()
        self._counts = [int(counts[0]), int(counts[1])]  # (documents, chunks), for the metrics' gauges
        metrics.record_store_counts(*self._counts)

    @property
    def embedder(self) -> EmbedderLike:
        if self._embedder is None:
            raise RuntimeError(f"{self.path} was opened without an embedder; adding and "
                               "searching need one")
        return self._embedder

    # --- lifecycle ----------------------------------------------------------------------

    def _setup(self) -> None:
        c = self._conn
        store_schema.require_fts5(c)
        c.execute("PRAGMA foreign_keys = ON")
        mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{self.path}: cannot use WAL journal mode (got {mode})")
        c.execute("PRAGMA synchronous = FULL")
        with self._transaction(counted=False):
            if c.execute("PRAGMA user_version").fetchone()[0] == 0:
                if self._embedder is None:
                    raise InvalidField("embedder", f"needed to create a new store {self.path}")
                store_schema.create(c, self._embedder_name(), int(self._embedder.dim))
            store_schema.migrate(c, self.path)

    def _embedder_name(self) -> str:
        return str(getattr(self._embedder, "name", ""))

    def _check_embedder(self) -> int:
        """The stored vectors' dimension, after checking the embedder gives the same kind."""
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        dim = int(meta["dim"])
        if self._embedder is None:
            return dim
        if int(self._embedder.dim) != dim:
            raise RuntimeError(f"{self.path}: vectors have dim {dim}, not {self._embedder.dim}")
        stored, name = meta.get("embedder", ""), self._embedder_name()
        if stored and name and stored != name:
            raise RuntimeError(f"{self.path}: vectors come from {stored}, not {name}")
        return dim

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writes -------------------------------------------------------------------------

    def add(self, title: str, text: str, *, kind: str = "document", privacy: str = "private",
            source: str = "", idempotency_key: str = "") -> DocumentInfo:
        """Chunk, embed, then store the document atomically; returns what was stored (or, for
        a key already used, the document stored under it)."""
        title, kind = _validate(title, text, kind, privacy, source)
        digest = _request_digest(title, text, kind, privacy, source)
        if idempotency_key and (known := self._by_key(idempotency_key, digest)) is not None:
            return known
        chunks = chunk_text(text)
        vectors = self._embed_chunks(chunks)
        info = DocumentInfo(id=uuid.uuid4().hex, title=title, kind=kind, privacy=privacy,
                            source=source, bytes=len(text.encode("utf-8")),
                            created_unix_ms=time.time_ns() // 1_000_000,
                            chunk_count=len(chunks))
        rows = [(info.id, i, chunk, vectors[i].tobytes()) for i, chunk in enumerate(chunks)]
        with self._lock, self._transaction():
            if idempotency_key and (known := self._by_key(idempotency_key, digest)) is not None:
                return known  # a concurrent add with the same key won the race
            self._conn.execute(
                "INSERT INTO documents (id, title, kind, privacy, source, bytes, created_unix_ms, "
                "chunk_count, idempotency_key, request_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (info.id, info.title, info.kind, info.privacy, info.source, info.bytes,
                 info.created_unix_ms, info.chunk_count, idempotency_key or None, digest))
            self._conn.executemany(
                "INSERT INTO chunks (doc_id, idx, text, embedding) VALUES (?, ?, ?, ?)", rows)
        logger.info("added document %s (%s, %s, %d chunks)", info.id, kind, privacy, len(rows))
        self._count(1, len(rows))
        return info

    def _count(self, documents: int, chunks: int) -> None:
        """Move the metrics' gauges by what this connection changed (no extra statement in add)."""
        with self._lock:
            self._counts = [self._counts[0] + documents, self._counts[1] + chunks]
            metrics.record_store_counts(*self._counts)

    def _by_key(self, key: str, digest: str) -> DocumentInfo | None:
        """The document stored under idempotency `key`; Conflict if it came from another request."""
        with self._lock:
            row = self._conn.execute(f"SELECT {_DOC_COLUMNS}, request_sha256 FROM documents "
                                     "WHERE idempotency_key = ?", (key,)).fetchone()
        if row is None:
            return None
        if row[-1] != digest:
            raise Conflict("idempotency_key: already used for a different document; send a new key")
        return DocumentInfo(*row[:-1])

    def _embed_chunks(self, chunks: Sequence[str]) -> np.ndarray:
        vectors = np.ascontiguousarray(self.embedder.embed(chunks), dtype=np.float32)
        if vectors.shape != (len(chunks), self.dim):
            raise RuntimeError(f"embedder returned shape {vectors.shape}, expected "
                               f"({len(chunks)}, {self.dim})")
        return vectors

    def delete(self, doc_id: str) -> bool:
        """Remove the document, its chunks, vectors and FTS rows; False if it was not there."""
        with self._lock, self._transaction():
            row = self._conn.execute("SELECT chunk_count FROM documents WHERE id = ?", (doc_id,)).fetchone()
            cur = self._conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
        if cur.rowcount > 0:
            self._count(-1, -int(row[0]) if row else 0)
        return cur.rowcount > 0

    def set_privacy(self, doc_id: str, privacy: str) -> DocumentInfo:
        _check_choice("privacy", privacy, PRIVACIES)
        with self._lock, self._transaction():
            self._conn.execute("UPDATE documents SET privacy = ? WHERE id = ?",
                               (privacy, doc_id))
        info = self.get(doc_id)
        if info is None:
            raise NotFound(f"no document with id {doc_id!r}")
        return info

    @contextmanager
    def _transaction(self, counted: bool = True) -> Iterator[None]:
        """BEGIN IMMEDIATE .. COMMIT, or ROLLBACK on any exception; the caller holds the lock."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        if counted:
            self._writes += 1

    # --- reads --------------------------------------------------------------------------

    def get(self, doc_id: str) -> DocumentInfo | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_DOC_COLUMNS} FROM documents WHERE id = ?",
                                     (doc_id,)).fetchone()
        return DocumentInfo(*row) if row else None

    def list(self) -> builtins.list[DocumentInfo]:
        """Every document, oldest first."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_DOC_COLUMNS} FROM documents "
                                      "ORDER BY created_unix_ms, id").fetchall()
        return [DocumentInfo(*r) for r in rows]

    def page(self, after: tuple[int, str] | None, limit: int) -> builtins.list[DocumentInfo]:
        """Up to `limit` documents after position (created_unix_ms, id), oldest first; titles and
        sources cut to MAX_TITLE_CHARS / MAX_SOURCE_CHARS in SQL (`truncated` marks them)."""
        created, doc_id = after if after is not None else (-(2**63), "")
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, substr(title, 1, ?), kind, privacy, substr(source, 1, ?), bytes, "
                "created_unix_ms, chunk_count, length(title) > ? OR length(source) > ? FROM documents "
                "WHERE (created_unix_ms, id) > (?, ?) ORDER BY created_unix_ms, id LIMIT ?",
                (MAX_TITLE_CHARS, MAX_SOURCE_CHARS, MAX_TITLE_CHARS, MAX_SOURCE_CHARS, created, doc_id,
                 limit)).fetchall()
        return [DocumentInfo(*r[:-1], truncated=bool(r[-1])) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM documents").fetchone()[0])

    def chunk_rows(self, doc_id: str) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM chunks WHERE doc_id = ?",
                                          (doc_id,)).fetchone()[0])

    def nearest(self, query: np.ndarray, limit: int) -> builtins.list[tuple[int, float]]:
        """(chunk id, cosine) of the `limit` chunks most similar to the unit vector `query`."""
        metrics.record_retrieval()
        matrix, ids = self._vectors()
        if len(ids) == 0 or limit < 1:
            return []
        scores = matrix @ np.asarray(query, dtype=np.float32).reshape(self.dim)
        top = np.argsort(-scores, kind="stable")[:limit]
        return [(int(ids[i]), float(scores[i])) for i in top]

    def similarity(self, query: np.ndarray, chunk_ids: Iterable[int]) -> dict[int, float]:
        """Cosine of `query` with each given chunk (ids not stored are left out)."""
        matrix, ids = self._vectors()
        pos = {int(c): i for i, c in enumerate(ids)}
        q = np.asarray(query, dtype=np.float32).reshape(self.dim)
        return {c: float(matrix[pos[c]] @ q) for c in chunk_ids if c in pos}

    def keyword_search(self, match: str, limit: int) -> builtins.list[int]:
        """Chunk ids matching an escaped FTS5 expression (`retrieval.fts_query`), best first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY rank LIMIT ?",
                (match, limit)).fetchall()
        return [int(r[0]) for r in rows]

    def chunks(self, chunk_ids: Iterable[int]) -> dict[int, ChunkRecord]:
        ids = builtins.list(chunk_ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._conn.execute(
                "SELECT c.id, c.doc_id, substr(d.title, 1, ?), c.idx, c.text, d.privacy FROM chunks c "
                f"JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({marks})",
                [MAX_TITLE_CHARS, *ids]).fetchall()
        return {int(r[0]): ChunkRecord(*r) for r in rows}

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
            key = (version, self._writes)
            if self._cache is None or self._cache_key != key:
                rows = self._conn.execute("SELECT id, embedding FROM chunks ORDER BY id").fetchall()
                matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
                self._cache = (matrix.reshape(-1, self.dim),
                               np.asarray([r[0] for r in rows], dtype=np.int64))
                self._cache_key = key
            return self._cache

    def check_consistency(self) -> builtins.list[str]:
        """Every problem found, in words; empty when the store is consistent."""
        with self._lock:
            return store_schema.find_problems(self._conn, self.dim)


_DOC_COLUMNS = "id, title, kind, privacy, source, bytes, created_unix_ms, chunk_count"


def _validate(title: str, text: str, kind: str, privacy: str, source: str) -> tuple[str, str]:
    """(title, kind) normalized, or `InvalidField`; an empty title becomes the first line."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidField("text", "must not be empty")
    size = len(text.encode("utf-8"))
    if size > MAX_DOCUMENT_BYTES:
        raise InvalidField("text", f"is {size} bytes, the limit is {MAX_DOCUMENT_BYTES}")
    kind = kind or "document"
    _check_choice("kind", kind, KINDS)
    _check_choice("privacy", privacy, PRIVACIES)
    if not isinstance(source, str):
        raise InvalidField("source", "must be a string")
    if len(source) > MAX_SOURCE_CHARS:
        raise InvalidField("source", f"is {len(source)} characters, the limit is {MAX_SOURCE_CHARS}")
    title = (title or "").strip() or text.strip().splitlines()[0].strip()[:80]
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidField("title", f"is {len(title)} characters, the limit is {MAX_TITLE_CHARS}")
    return title, kind


def _request_digest(title: str, text: str, kind: str, privacy: str, source: str) -> str:
    """What an idempotency key is bound to: the normalized request, hashed."""
    h = hashlib.sha256()
    for part in (title, kind, privacy, source, text):
        data = part.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidField(name, f"must be one of {', '.join(allowed)}, got {shown(value)}")
