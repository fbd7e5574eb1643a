#!/usr/bin/env bash
# Regenerates the files derived from the API types: the CRD copies and the README's field reference.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/v4d crd --write >/dev/null
.venv/bin/python - <<'PY'
import re, subprocess
table = subprocess.run([".venv/bin/v4d", "crd", "--markdown"], check=True, capture_output=True, text=True).stdout
s = open("README.md").read()
s = re.sub(r"(<!-- crd-reference:start -->\n).*?(<!-- crd-reference:end -->)", lambda m: m.group(1) + table.rstrip("\n") + "\n" + m.group(2), s, flags=re.S)
open("README.md", "w").write(s)
PY
