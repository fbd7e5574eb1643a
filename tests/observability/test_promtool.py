"""The rules pass `promtool check rules` and the unit tests in rules_test.yaml."""

import subprocess
from pathlib import Path

import pytest
import yaml

from v4d.operator import observability, rules

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd)


def test_promtool_check_rules():
    out = _promtool("check", "rules", observability.RULES_FILE)
    assert out.returncode == 0, out.stdout + out.stderr
    n = sum(len(g["rules"]) for g in rules.rule_groups()["groups"])
    assert f"SUCCESS: {n} rules found" in out.stdout


def test_promtool_check_rules_rejects_a_broken_expression(tmp_path):
    broken = {"groups": [{"name": "x", "rules": [{"record": "v4d:x:sum", "expr": "sum by (a (b)"}]}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(broken))
    assert _promtool("check", "rules", str(tmp_path / "bad.yaml")).returncode == 1


def test_promtool_unit_tests_pass():
    out = _promtool("test", "rules", "rules_test.yaml", cwd=HERE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_manifest_prometheusrule_holds_the_same_rules():
    manifest = yaml.safe_load((ROOT / observability.MANIFEST_DIR / "prometheusrule.yaml").read_text())
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"] == yaml.safe_load((ROOT / observability.RULES_FILE).read_text())
