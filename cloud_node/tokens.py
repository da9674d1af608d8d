"""Per-device tokens for the cloud: issued, listed and revoked in a store that keeps only salted hashes.

Guarantees:
- A token is `tdm_<id>_<secret>`: a 12-hex-digit id (public, names the record) and 256 random
  bits. The store (a JSON file, mode 0600) keeps the id, a name, a random salt and
  SHA-256(salt || secret); never the secret. 256 random bits need no slow hash: a stolen store
  gives no token.
- Changes (issue, revoke) are serialised across processes by an exclusive lock on a sibling
  `.lock` file and land atomically (`tandem.security.write_secret`), so a reader sees the old
  store or the new one, never half of one. Only `issue` creates a store (and its folder, mode
  0700); `revoke` and `require_store` on a store that does not exist raise TokenError
  ("no token store at PATH") and create nothing.
- `STORE_FILE` is the store's file name in a folder of secrets (the local stack's
  `TANDEM_HOME/secure`, the head's `/opt/tandem/secure`).
- `TokenChecker.check` compares in constant time and re-reads the store when it changed, at
  most `reload_s` after the change (at once for an id it does not know, so a new token works
  immediately): a revocation reaches a running gateway within `reload_s`
  (1 s by default) without a restart. A store that cannot be read keeps the last good copy (and
  says so in the log once per change); before the first good read every token is unknown.
- A store file that another user could have changed (writable by its group or by others, or
  owned by neither this process's user nor root; `tandem.security.file_exposure`) is refused
  like a corrupt one: a TokenError when read (so the gateway does not start, exit 2), the last
  good copy while running. Otherwise a local user could edit `revoked` back to null. A
  Kubernetes Secret mounted read-only (root-owned, 0440) passes.
- Nothing here logs a token or puts one in an exception.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tandem.security import file_exposure, write_secret

log = logging.getLogger(__name__)

PREFIX = "tdm"
_TOKEN = re.compile(r"^tdm_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
DEFAULT_MAX_SESSIONS = 4
MAX_SESSIONS_LIMIT = 1024
RELOAD_S = 1.0
STORE_FILE = "cloud-tokens.json"


class TokenError(ValueError):
    """A bad store operation (an unknown token, a duplicate name, a bad store file)."""


@dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    salt: str
    digest: str
    created: float
    max_sessions: int = DEFAULT_MAX_SESSIONS
    revoked: float | None = None

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(_digest(self.salt, secret), self.digest)

    def public(self) -> dict[str, object]:
        """What `tandem tokens list` shows: no salt, no digest."""
        return {"id": self.id, "name": self.name, "created": self.created, "max_sessions": self.max_sessions,
                "revoked": self.revoked}


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode("ascii")).hexdigest()


def parse(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    m = _TOKEN.match(token.strip())
    return (m.group(1), m.group(2)) if m else None


class TokenStore:
    """The store file; every change holds the lock and rewrites the file atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def records(self) -> list[TokenRecord]:
        return load_records(self.path)

    def _save(self, records: list[TokenRecord]) -> None:
        write_secret(self.path, json.dumps({"version": 1, "tokens": [asdict(r) for r in records]}, indent=1))

    def issue(self, name: str, max_sessions: int = DEFAULT_MAX_SESSIONS) -> tuple[TokenRecord, str]:
        """A new token for device `name`: (its record, the token, which is shown only now)."""
        if not _NAME.match(name):
            raise TokenError(f"name: 1 to 64 letters, digits or ._@- (starting with a letter or digit), got {name!r}")
        if not 1 <= max_sessions <= MAX_SESSIONS_LIMIT:
            raise TokenError(f"max_sessions: must be in [1, {MAX_SESSIONS_LIMIT}], got {max_sessions}")
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._locked():
            records = self.records()
            if any(r.name == name and r.revoked is None for r in records):
                raise TokenError(f"a live token named {name!r} exists; revoke it first or choose another name")
            ids = {r.id for r in records}
            token_id = secrets.token_hex(6)
            while token_id in ids:
                token_id = secrets.token_hex(6)
            secret, salt = secrets.token_urlsafe(32), secrets.token_hex(16)
            record = TokenRecord(token_id, name, salt, _digest(salt, secret), time.time(), max_sessions)
            self._save([*records, record])
        return record, f"{PREFIX}_{token_id}_{secret}"

    def revoke(self, key: str) -> TokenRecord:
        """Revoke the live token whose id or name is `key`; a store that does not exist is a TokenError."""
        require_store(self.path)
        with self._locked():
            records = require_store(self.path)
            live = [r for r in records if r.revoked is None and key in (r.id, r.name)]
            if not live:
                raise TokenError(f"no live token with id or name {key!r}")
            done = replace(live[0], revoked=time.time())
            self._save([done if r is live[0] else r for r in records])
        return done


def require_store(path: Path) -> list[TokenRecord]:
    """The records of a store that must exist (for list, revoke and a gateway's --tokens-file)."""
    if not Path(path).exists():
        raise TokenError(f"no token store at {path}")
    return load_records(path)


def load_records(path: Path) -> list[TokenRecord]:
    """The store's records ([] when the file does not exist); TokenError when it is not a store."""
    try:
        with open(path, "rb") as handle:  # bytes: json.loads decodes, and a bad byte is a ValueError below
            problem = file_exposure(os.fstat(handle.fileno()), 0o022, check_owner=True)
            if problem:
                raise TokenError(f"token store {path}: {problem}")
            text = handle.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TokenError(f"token store {path}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
        return [TokenRecord(**item) for item in data["tokens"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenError(f"token store {path}: not a token store ({type(exc).__name__})") from None


class Verdict(enum.Enum):
    VALID = "valid"
    UNKNOWN = "unknown"  # malformed, no such id, or the secret does not match
    REVOKED = "revoked"


class TokenChecker:
    """Checks tokens against the store, re-reading it at most `reload_s` after it changed."""

    def __init__(self, path: Path, reload_s: float = RELOAD_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.reload_s, self._clock = Path(path), reload_s, clock
        self._lock = threading.Lock()
        self._by_id: dict[str, TokenRecord] = {}
        self._stamp: tuple[int, ...] | None = None
        self._checked = -float("inf")
        self.refresh(force=True)

    def _file_stamp(self) -> tuple[int, ...] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        # The mode and owner too: a store refused for them is read again once they are fixed.
        return st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode, st.st_uid

    def refresh(self, force: bool = False, look: bool = False) -> None:
        """Re-read the store if it changed and `reload_s` passed since the last look (or `look`:
        now, for an id not known yet, so a token issued a moment ago works at once)."""
        now = self._clock()
        with self._lock:
            if not (force or look) and now - self._checked < self.reload_s:
                return
            self._checked = now
            stamp = self._file_stamp()
            if stamp == self._stamp and not force:
                return
            try:
                records = load_records(self.path)
            except TokenError as exc:
                if stamp != self._stamp:
                    log.error("%s; keeping the last good copy (%d tokens)", exc, len(self._by_id))
                self._stamp = stamp
                return
            self._by_id = {r.id: r for r in records}
            self._stamp = stamp

    def check(self, token: str | None) -> tuple[Verdict, TokenRecord | None]:
        self.refresh()
        parsed = parse(token) if token else None
        if parsed is None:
            return Verdict.UNKNOWN, None
        record = self._by_id.get(parsed[0])
        if record is None:
            self.refresh(look=True)  # one stat(); the file is read only if it changed
            record = self._by_id.get(parsed[0])
        if record is None or not record.matches(parsed[1]):
            return Verdict.UNKNOWN, None
        return (Verdict.REVOKED if record.revoked is not None else Verdict.VALID), record

    def revoked(self, token_id: str) -> bool:
        """Whether the token with this id is revoked now (for streams already open)."""
        self.refresh()
        record = self._by_id.get(token_id)
        return record is None or record.revoked is not None
