#!/usr/bin/env bash
# The README's second command: set everything up, then run every test (slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests; that counts as a failure" >&2
  exit 1
fi
exit "$rc"
