#!/usr/bin/env bash
# The README's test command: sets up everything the tests need, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
for s in scripts/setup-*.sh; do [ -x "$s" ] && "$s"; done
export PATH="$PWD/.venv/bin:$PWD/.tools/bin:$PATH"
export PYTHONFAULTHANDLER=1  # a native crash (in a library's threads, even at exit) prints every thread's stack
ruff check .
ruff format --check .
exec python -m pytest "$@"
