"""The layers stay one-way (operator -> serving -> kernels); pure modules stay torch/ray/kopf-free."""

import subprocess
import sys
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / ".importlinter")) == 0


def test_kernel_and_model_tests_collect_without_the_cluster_packages():
    """A bare GPU machine (scripts/gpu-check.sh) has torch, triton, pytest, numpy and safetensors only:
    the session conftest must not import kubernetes (or ray, kopf, fastapi) to collect those tests."""
    blocked = ("kubernetes", "ray", "kopf", "fastapi")
    code = (
        "import sys, pytest\n"
        f"sys.modules.update(dict.fromkeys({blocked!r}))\n"
        "sys.exit(pytest.main(['--collect-only', '-q', 'tests/kernels', 'tests/model']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
