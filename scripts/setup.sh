#!/usr/bin/env bash
# Creates .venv (if missing) and installs v4d with its test dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip, with its harmless "Location ... is ignored" warnings (unreachable extra index folders) left out;
# pip's own exit status is the function's, so a failed install stops the setup here (set -e).
pip_install() {
  .venv/bin/pip install -q "$@" 2> >(grep -v "is ignored" >&2)
}
# torch first, pinned exactly: only torch==2.13.0 resolves to the CPU wheel.
pip_install torch==2.13.0
pip_install -e ".[dev]"
.venv/bin/python -c "import v4d.operator.cli, torch, ray" >/dev/null
