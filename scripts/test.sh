#!/usr/bin/env bash
# The README's second command: set everything up, then run the checks and every test (slow ones
# included): ruff, mypy (core, SDK, protos' stubs), the import contracts, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The personal store's crash tests kill SQLite inside its log writes, found with strace.
if ! command -v strace >/dev/null 2>&1; then
  echo "test: installing strace (apt-get)" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q strace >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q strace >/dev/null; }
fi
echo "test: ruff check" >&2
.venv/bin/ruff check .
echo "test: mypy" >&2
.venv/bin/mypy
echo "test: import contracts (lint-imports)" >&2
.venv/bin/lint-imports
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests; that counts as a failure" >&2
  exit 1
fi
exit "$rc"
