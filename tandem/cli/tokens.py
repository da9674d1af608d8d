"""`tandem tokens issue|list|revoke`: the cloud's per-device tokens.

Guarantees:
- The store is `--store`, by default the one the local stack (`tandem up`, `tandem demo`) runs
  with: `TANDEM_HOME/secure/cloud-tokens.json` (`tandem.ops.local_stack.secure_dir`), the file its
  cloud's `--tokens-file` names. It holds salted hashes only (`cloud_node.tokens`), mode 0600.
- `list` and `revoke` on a store that does not exist exit 2 with "no token store at PATH" and
  create nothing. Only `issue` makes a store: in a folder that exists for `--store`; the default
  store's folder is made (mode 0700) as `tandem up` makes it.
- `issue NAME` writes the new token to `--out FILE` (mode 0600) and prints only its id, or, with
  no `--out`, prints the token once on stdout (nothing else goes to stdout). A token is never
  shown again and never appears in an error message.
- A token whose secret reached no one is not left live: `--out` is checked before the token is
  made (its folder must exist, it must not be a folder; no folder is created), and a token whose
  write or print still fails is revoked. `--max-sessions` outside [1, 1024] exits 2.
- `list` shows id, name, created, session limit and revocation, never a hash (`--json` for
  scripts). `revoke ID|NAME` takes effect on a running gateway within `cloud_node.tokens.RELOAD_S`
  (1 s): new calls get PERMISSION_DENIED and its open streams end.
- Bad input (a bad name, an unknown token, an unreadable store) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tandem.cli.main import CliError


def default_store() -> Path:
    """The store of the local stack that `tandem up` runs."""
    from cloud_node.tokens import STORE_FILE
    from tandem.ops.local_stack import secure_dir

    return secure_dir() / STORE_FILE


def add_parser(sub: Any) -> None:
    p = sub.add_parser("tokens", help="issue, list and revoke the cloud's per-device tokens",
                       description="Issue, list and revoke the cloud's per-device tokens. Without --store they "
                                   "are those of the local stack that `tandem up` runs.")
    p.add_argument("--store", type=Path, default=None,
                   help="token store (default: TANDEM_HOME/secure/cloud-tokens.json, the store of the local "
                        "stack that `tandem up` runs)")
    ops = p.add_subparsers(dest="op", metavar="OP", required=True)
    issue = ops.add_parser("issue", help="issue a token for a device")
    issue.add_argument("name", help="the device's name (letters, digits, ._@-)")
    issue.add_argument("--max-sessions", type=int, default=None, help="sessions this device may hold open at once, "
                                                                       "1 to 1024 (default 4)")
    issue.add_argument("--out", type=Path, help="write the token to this file (mode 0600) instead of stdout; "
                                                "its folder must exist")
    ls = ops.add_parser("list", help="the tokens (never their secrets)")
    ls.add_argument("--json", action="store_true", help="one JSON array")
    rev = ops.add_parser("revoke", help="revoke a token by id or device name")
    rev.add_argument("key", metavar="ID|NAME")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cloud_node.tokens import TokenError, TokenStore, require_store

    store = TokenStore(args.store or default_store())
    try:
        if args.op == "issue":
            if args.store is not None and not store.path.parent.is_dir():
                raise CliError(f"--store {store.path}: the folder {store.path.parent} does not exist; create it first")
            _issue(store, args)
        elif args.op == "list":
            rows = [r.public() for r in require_store(store.path)]
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                for r in rows:
                    state = "live" if r["revoked"] is None else "revoked " + _when(r["revoked"])
                    print(f"{r['id']}  {r['name']:<20} created {_when(r['created'])}  "
                          f"max_sessions {r['max_sessions']:<4} {state}")
        else:
            record = store.revoke(args.key)
            print(f"revoked {record.id} ({record.name}); a running gateway refuses it within 1 s", file=sys.stderr)
    except TokenError as exc:
        raise CliError(str(exc)) from None
    return 0


def _issue(store: Any, args: argparse.Namespace) -> None:
    from cloud_node.tokens import DEFAULT_MAX_SESSIONS, MAX_SESSIONS_LIMIT
    from tandem import security

    max_sessions = DEFAULT_MAX_SESSIONS if args.max_sessions is None else args.max_sessions
    if not 1 <= max_sessions <= MAX_SESSIONS_LIMIT:
        raise CliError(f"--max-sessions: must be in [1, {MAX_SESSIONS_LIMIT}], got {max_sessions}")
    if args.out is not None:
        _check_out(args.out)
    record, token = store.issue(args.name, max_sessions)
    if args.out is None:
        print(f"issued {record.id} for {record.name}; the token follows, shown only now", file=sys.stderr)
        try:
            print(token, flush=True)
        except OSError:
            print(f"tandem tokens: stdout closed before the token was shown; {_revoke(store, record.id)}",
                  file=sys.stderr)
            raise
        return
    try:
        security.write_secret(args.out, token + "\n")
    except OSError as exc:
        raise CliError(f"--out {args.out}: cannot write the token ({exc.strerror or exc}); "
                       f"{_revoke(store, record.id)}") from None
    print(f"issued {record.id} for {record.name}; the token is in {args.out}", file=sys.stderr)


def _check_out(path: Path) -> None:
    """Refuse an --out path the token surely cannot be written to, before the token exists."""
    if path.is_dir():
        raise CliError(f"--out {path}: is a folder; name a file")
    folder = path.parent
    if not folder.is_dir():
        raise CliError(f"--out {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise CliError(f"--out {path}: cannot write in {folder} (permission denied)")


def _revoke(store: Any, token_id: str) -> str:
    """Revoke a token whose secret reached no one; what happened, for the error message."""
    from cloud_node.tokens import TokenError

    try:
        store.revoke(token_id)
    except (TokenError, OSError) as exc:
        return f"revoking token {token_id} failed too ({exc}); run `tandem tokens revoke {token_id}`"
    return f"token {token_id} was revoked"


def _when(ts: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))
