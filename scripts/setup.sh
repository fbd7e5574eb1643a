#!/usr/bin/env bash
# Creates .venv (if missing) and installs v4d with its test dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned exactly: only torch==2.13.0 resolves to the CPU wheel.
.venv/bin/pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
.venv/bin/pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import v4d.operator.cli, torch, ray" >/dev/null
