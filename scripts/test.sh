#!/usr/bin/env bash
# The README's second command: set everything up, then run the checks and every test (slow ones
# included): ruff, mypy (core, SDK, protos' stubs), the import contracts, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
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
