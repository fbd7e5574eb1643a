"""`validate_spec` / `v4d validate`: every invalid spec names its field path and what was expected."""

import copy
import re

import pytest
import yaml
from click.testing import CliRunner
from helpers.opspecs import EXAMPLES, load_example

from v4d.operator.cli import main
from v4d.operator.validate import Issue, validate_manifest, validate_spec
from v4d.serving.config import TINY

BASE = load_example("local-tiny.yaml")["spec"]
TINY_CONFIG = TINY.to_dict()


def _set(spec: dict, path: str, value) -> None:
    """Set (or with value DELETE, remove) `a.b[1].c` in spec."""
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    node = spec
    for p in parts[:-1]:
        node = node[p]
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value


DELETE = object()
TWO_ATTENTION = [{**BASE["pools"][0]}, {**BASE["pools"][1], "roles": ["attention", "experts"]}]

# (id, {path: value}, expected path, expected message fragment)
CORPUS = [
    (
        "vendor",
        {"pools[1].vendor": "amd"},
        "spec.pools[1].vendor",
        "expected one of nvidia, ascend, got 'amd'",
    ),
    ("replicas-string", {"replicas": "3"}, "spec.replicas", "expected an integer, got string '3'"),
    ("replicas-negative", {"replicas": -1}, "spec.replicas", "must be >= 0, got -1"),
    ("replicas-float", {"replicas": 1.5}, "spec.replicas", "expected an integer, got number 1.5"),
    (
        "min-gt-max",
        {"autoscaling.minReplicas": 3, "autoscaling.maxReplicas": 2},
        "spec.autoscaling.minReplicas",
        "must be <= maxReplicas (3 > 2)",
    ),
    (
        "util-one",
        {"autoscaling.targetKVCacheUtilization": 1.0},
        "spec.autoscaling.targetKVCacheUtilization",
        "must be < 1, got 1.0",
    ),
    (
        "util-zero",
        {"autoscaling.targetKVCacheUtilization": 0},
        "spec.autoscaling.targetKVCacheUtilization",
        "must be > 0, got 0",
    ),
    (
        "util-negative",
        {"autoscaling.targetKVCacheUtilization": -0.5},
        "spec.autoscaling.targetKVCacheUtilization",
        "must be > 0, got -0.5",
    ),
    (
        "duplicate-pool",
        {"pools[1].name": "gpu"},
        "spec.pools[1].name",
        "duplicate pool name 'gpu' (also spec.pools[0])",
    ),
    ("no-roles", {"pools[1].roles": []}, "spec.pools[1].roles", "must have at least 1 item(s), got 0"),
    (
        "role-twice",
        {"pools[1].roles": ["experts", "experts"]},
        "spec.pools[1].roles",
        "role 'experts' listed twice",
    ),
    (
        "unknown-role",
        {"pools[1].roles": ["prefill"]},
        "spec.pools[1].roles[0]",
        "expected one of attention, experts, got 'prefill'",
    ),
    (
        "no-experts-pool",
        {"pools": [{**BASE["pools"][0], "roles": ["attention"]}]},
        "spec.pools",
        "no pool has role 'experts'",
    ),
    ("no-attention-pool", {"pools[0].roles": ["experts"]}, "spec.pools", "no pool has role 'attention'"),
    (
        "two-attention-pools",
        {"pools": TWO_ATTENTION},
        "spec.pools[1].roles",
        "attention runs on one pool only",
    ),
    (
        "unknown-preset",
        {"model.preset": "deepseek-v5"},
        "spec.model.preset",
        "unknown preset 'deepseek-v5'; expected one of",
    ),
    ("preset-and-config", {"model.config": TINY_CONFIG}, "spec.model", "set only one of preset and config"),
    ("no-model", {"model.preset": DELETE}, "spec.model", "set one of preset or config"),
    (
        "config-ratios",
        {"model.preset": DELETE, "model.config": {**TINY_CONFIG, "compress_ratios": [0, 4]}},
        "spec.model.config.compress_ratios",
        "expected at least 6 entries",
    ),
    (
        "config-scoring",
        {"model.preset": DELETE, "model.config": {**TINY_CONFIG, "scoring_func": "softmax"}},
        "spec.model.config.scoring_func",
        "only 'sqrtsoftplus' is supported",
    ),
    (
        "config-o-groups",
        {"model.preset": DELETE, "model.config": {**TINY_CONFIG, "o_groups": 3}},
        "spec.model.config.o_groups",
        "must divide num_attention_heads",
    ),
    (
        "config-type",
        {"model.preset": DELETE, "model.config": {**TINY_CONFIG, "hidden_size": "big"}},
        "spec.model.config.hidden_size",
        "expected an integer, got string 'big'",
    ),
    (
        "config-zero-experts",
        {"model.preset": DELETE, "model.config": {**TINY_CONFIG, "n_routed_experts": 0}},
        "spec.model.config.n_routed_experts",
        "must be positive, got 0",
    ),
    (
        "config-not-object",
        {"model.preset": DELETE, "model.config": [1, 2]},
        "spec.model.config",
        "expected an object, got list",
    ),
    (
        "uri-s3",
        {"model.weights.uri": "s3://bucket/v4"},
        "spec.model.weights.uri",
        "scheme 's3://' is not supported yet",
    ),
    (
        "uri-relative",
        {"model.weights.uri": "hostpath://models/v4"},
        "spec.model.weights.uri",
        "hostpath:// needs an absolute path",
    ),
    (
        "uri-no-claim",
        {"model.weights.uri": "pvc:///v4"},
        "spec.model.weights.uri",
        "pvc:// needs a claim name first",
    ),
    (
        "uri-no-scheme",
        {"model.weights.uri": "/models/v4"},
        "spec.model.weights.uri",
        "expected pvc://<claim>/<path>",
    ),
    ("context-zero", {"model.maxContextTokens": 0}, "spec.model.maxContextTokens", "must be >= 1, got 0"),
    (
        "context-beyond-model",
        {"model.maxContextTokens": 100000},
        "spec.model.maxContextTokens",
        "100000 exceeds the model's max_position_embeddings 65536",
    ),
    ("unknown-pool-field", {"pools[0].gpus": 4}, "spec.pools[0].gpus", "unknown field"),
    ("unknown-spec-field", {"replica": 2}, "spec.replica", "unknown field"),
    (
        "missing-devices",
        {"pools[0].devicesPerNode": DELETE},
        "spec.pools[0].devicesPerNode",
        "required field is missing",
    ),
    ("missing-model", {"model": DELETE}, "spec.model", "required field is missing"),
    ("pool-name", {"pools[0].name": "GPU_pool"}, "spec.pools[0].name", "expected a DNS label"),
    ("memory-zero", {"pools[0].deviceMemoryGiB": 0}, "spec.pools[0].deviceMemoryGiB", "must be > 0, got 0"),
    ("devices-zero", {"pools[0].devicesPerNode": 0}, "spec.pools[0].devicesPerNode", "must be >= 1, got 0"),
    ("max-nodes-zero", {"pools[1].maxNodes": 0}, "spec.pools[1].maxNodes", "must be >= 1, got 0"),
    (
        "resource-vendor",
        {"pools[1].resourceName": "nvidia.com/gpu"},
        "spec.pools[1].resourceName",
        "'nvidia.com/gpu' is a nvidia resource but the pool's vendor is 'ascend'",
    ),
    (
        "resource-format",
        {"pools[0].resourceName": "gpu"},
        "spec.pools[0].resourceName",
        "expected a string matching",
    ),
    (
        "toleration-exists-value",
        {"pools[0].tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
        "spec.pools[0].tolerations[0].value",
        "must be empty when operator is Exists",
    ),
    (
        "toleration-effect",
        {"pools[0].tolerations": [{"key": "k", "effect": "Sometimes"}]},
        "spec.pools[0].tolerations[0].effect",
        "expected one of NoSchedule, PreferNoSchedule, NoExecute, got 'Sometimes'",
    ),
    (
        "toleration-no-key",
        {"pools[0].tolerations": [{"operator": "Equal", "value": "v"}]},
        "spec.pools[0].tolerations[0].operator",
        "must be Exists when key is empty",
    ),
    (
        "replicas-outside",
        {"replicas": 5},
        "spec.replicas",
        "5 is outside autoscaling [minReplicas, maxReplicas] = [1, 2]",
    ),
    ("port-ray", {"serving.port": 6379}, "spec.serving.port", "6379 is taken by the Ray GCS"),
    ("port-range", {"serving.port": 70000}, "spec.serving.port", "must be <= 65535, got 70000"),
    (
        "batch-below-seqs",
        {"serving.maxBatchTokens": 4},
        "spec.serving.maxBatchTokens",
        "must be >= maxNumSeqs (4 < 8)",
    ),
    (
        "secret-no-key",
        {"serving.apiKeySecretRef": {"name": "s"}},
        "spec.serving.apiKeySecretRef.key",
        "required field is missing",
    ),
    ("no-pools", {"pools": []}, "spec.pools", "must have at least 1 item(s), got 0"),
    ("pools-not-list", {"pools": {"name": "gpu"}}, "spec.pools", "expected a list, got object"),
    (
        "enabled-string",
        {"autoscaling.enabled": "yes"},
        "spec.autoscaling.enabled",
        "expected a boolean, got string 'yes'",
    ),
    (
        "node-selector-int",
        {"pools[0].nodeSelector": {"zone": 1}},
        "spec.pools[0].nodeSelector.zone",
        "expected a string, got integer 1",
    ),
    (
        "redundant-negative",
        {"parallelism.redundantExperts": -1},
        "spec.parallelism.redundantExperts",
        "must be >= 0, got -1",
    ),
    (
        "ep-zero",
        {"parallelism.expertParallelSize": 0},
        "spec.parallelism.expertParallelSize",
        "must be >= 1, got 0",
    ),
    ("served-empty", {"model.servedName": ""}, "spec.model.servedName", "must not be empty"),
]


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 30
    assert len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(("changes", "path", "message"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_invalid_spec_names_path_and_expectation(changes, path, message):
    spec = copy.deepcopy(BASE)
    for key, value in changes.items():
        _set(spec, key, value)
    issues = validate_spec(spec)
    assert issues, "expected at least one issue"
    hits = [i for i in issues if i.path == path]
    assert hits, f"no issue at {path}; got {[str(i) for i in issues]}"
    assert any(message in i.message for i in hits), [str(i) for i in hits]


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_examples_are_valid(example):
    assert validate_manifest(yaml.safe_load(example.read_text())) == []


def test_every_error_is_reported_at_once():
    spec = copy.deepcopy(BASE)
    _set(spec, "pools[1].vendor", "amd")
    _set(spec, "autoscaling.minReplicas", 3)
    _set(spec, "serving.port", 8265)
    paths = {i.path for i in validate_spec(spec)}
    assert {"spec.pools[1].vendor", "spec.autoscaling.minReplicas", "spec.serving.port"} <= paths


def test_manifest_envelope(tiny_manifest):
    tiny_manifest["apiVersion"] = "serving.v4d.dev/v1"
    tiny_manifest["kind"] = "Deployment"
    tiny_manifest["metadata"]["name"] = "Tiny_Model"
    issues = validate_manifest(tiny_manifest)
    assert Issue("apiVersion", "expected 'serving.v4d.dev/v1alpha1', got 'serving.v4d.dev/v1'") in issues
    assert Issue("kind", "expected 'V4Deployment', got 'Deployment'") in issues
    assert any(i.path == "metadata.name" and "DNS label" in i.message for i in issues)
    assert validate_manifest(["not", "a", "mapping"])[0].path == "(document)"


def test_cli_lists_errors_and_exits_1(tmp_path, tiny_manifest):
    tiny_manifest["spec"]["pools"][1]["vendor"] = "amd"
    tiny_manifest["spec"]["autoscaling"]["targetKVCacheUtilization"] = 1.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(tiny_manifest))
    run = CliRunner().invoke(main, ["validate", str(bad)])
    assert run.exit_code == 1
    assert "error: spec.pools[1].vendor: expected one of nvidia, ascend, got 'amd'" in run.stderr
    assert "error: spec.autoscaling.targetKVCacheUtilization: must be < 1, got 1.5" in run.stderr
    ok = CliRunner().invoke(main, ["validate", str(EXAMPLES[0])])
    assert ok.exit_code == 0 and "is valid" in ok.stdout
