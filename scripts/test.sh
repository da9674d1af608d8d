#!/usr/bin/env bash
# The README's second command: set everything up, then run the checks and every test (slow ones
# included): ruff, mypy (core, SDK, protos' stubs), the import contracts, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# System packages the tests use, from the distribution (apt-get; a package list update only when
# the plain install fails): strace, with which the personal store's crash tests kill SQLite inside
# its log writes; chromium and chromium-driver, the headless browser of the web console's test
# (tests/integration/test_console_browser.py drives /usr/bin/chromium through /usr/bin/chromedriver;
# no browser is downloaded from anywhere else).
apt_install() {  # apt_install COMMAND PACKAGE...: install PACKAGEs unless COMMAND is already there
  local command=$1; shift
  command -v "$command" >/dev/null 2>&1 && return 0
  echo "test: installing $* (apt-get)" >&2
  local SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q "$@" >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "$@" >/dev/null; }
}
apt_install strace strace
apt_install chromedriver chromium chromium-driver
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
