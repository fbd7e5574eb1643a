"""mypy passes on the pure modules (the list is `[tool.mypy] modules` in pyproject.toml).

The editable install maps `v4d.<part>` onto top-level folders through an import hook mypy cannot
follow, so mypy reads the checkout through a throwaway `v4d/` of symlinks (as scripts/gpu-check.sh
does for a bare GPU machine).
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_on_the_pure_modules(tmp_path):
    shim = tmp_path / "v4d"
    shim.mkdir()
    (shim / "__init__.py").write_text("")
    for part in ("operator", "serving", "kernels"):
        (shim / part).symlink_to(ROOT / part)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
