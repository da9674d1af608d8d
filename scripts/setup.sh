#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with the pinned
# dependencies (requirements.lock), the project itself, and the default model pair.
# Safe to run again: each step verifies and skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
  || { echo "setup: Python 3.11 is required (found $("$PY" --version 2>&1))" >&2; exit 2; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
# A stamp of the lock and pyproject skips pip when nothing changed since the last install.
stamp=.venv/.tandem-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned dependencies (a few minutes the first time)" >&2
  .venv/bin/python -m pip install --progress-bar on -q -c requirements.lock -e ".[all]"
  echo "$want" > "$stamp"
fi
echo "setup: fetching and verifying models" >&2
.venv/bin/tandem models fetch
