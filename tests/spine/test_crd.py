"""The CRD is generated from the API types; committed copies match; the schema is structural (k8s 1.20)."""

import copy

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from helpers.opspecs import EXAMPLES

from v4d.operator import crd
from v4d.operator.cli import main


@pytest.fixture(scope="module")
def generated() -> dict:
    return crd.crd()


@pytest.mark.parametrize("path", crd.CRD_FILES, ids=["manifests", "chart"])
def test_committed_crd_matches_generated(path):
    assert path.read_text() == crd.render_yaml(), f"{path} is stale: run `v4d crd --write`"


def test_v4d_crd_prints_it():
    out = CliRunner().invoke(main, ["crd"])
    assert out.exit_code == 0
    assert yaml.safe_load(out.stdout) == crd.crd()


def test_names_subresources_and_columns(generated):
    spec = generated["spec"]
    assert generated["apiVersion"] == "apiextensions.k8s.io/v1"
    assert generated["metadata"]["name"] == "v4deployments.serving.v4d.dev"
    assert spec["names"]["shortNames"] == ["v4d"] and spec["names"]["kind"] == "V4Deployment"
    assert "v4d" in spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas.attention.ready",
        "labelSelectorPath": ".status.selector",
    }
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Model",
        "Ready",
        "Desired",
        "KV",
        "Phase",
        "Age",
    ]


def _walk(node, path="$"):
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_for_kubernetes_1_20(generated):
    schema = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node, f"{path}: every node needs a type"
        for banned in (
            "$ref",
            "anyOf",
            "oneOf",
            "allOf",
            "title",
            "x-kubernetes-validations",
            "const",
            "$defs",
        ):
            assert banned not in node, f"{path}: {banned} is not allowed"
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("default", "x") != "", f"{path}: empty-string default"
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(key, True), bool), f"{path}: {key} must be the OpenAPI 3.0 boolean form"
        if node["type"] == "object" and path.endswith(".config"):
            assert node["x-kubernetes-preserve-unknown-fields"] is True


def test_schema_carries_enums_bounds_required_and_docs(generated):
    spec = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    pool = spec["properties"]["pools"]["items"]
    assert pool["properties"]["vendor"]["enum"] == ["nvidia", "ascend"]
    assert pool["properties"]["roles"]["items"]["enum"] == ["attention", "experts"]
    assert set(pool["required"]) == {
        "name",
        "vendor",
        "devicesPerNode",
        "deviceMemoryGiB",
        "maxNodes",
        "roles",
    }
    util = spec["properties"]["autoscaling"]["properties"]["targetKVCacheUtilization"]
    assert util["minimum"] == 0 and util["exclusiveMinimum"] is True
    assert util["maximum"] == 1 and util["exclusiveMaximum"] is True
    assert spec["required"] == ["model", "pools"]
    for path, node in _walk(spec):
        if path != "$" and not path.endswith(("[]", "{}")):  # every field is documented
            assert node.get("description"), f"{path}: missing description"
    assert "s3://" in spec["properties"]["model"]["properties"]["weights"]["properties"]["uri"]["description"]


def _draft4(node):
    """OpenAPI 3.0 -> JSON Schema draft 4 (nullable -> type union) so jsonschema can check manifests."""
    if isinstance(node, list):
        return [_draft4(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _draft4(v) for k, v in node.items() if not k.startswith("x-kubernetes") and k != "nullable"}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    return out


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_examples_pass_the_crd_schema(generated, example):
    schema = _draft4(generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator(schema).validate(yaml.safe_load(example.read_text()))


def test_crd_schema_rejects_what_the_api_rejects(generated):
    schema = _draft4(generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    for path, value in (
        (("pools", 0, "vendor"), "amd"),
        (("autoscaling", "targetKVCacheUtilization"), 1.0),
        (("replicas",), -1),
        (("pools", 0, "roles"), []),
    ):
        bad = copy.deepcopy(doc)
        node = bad["spec"]
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft4Validator(schema).validate(bad)


def test_docs_field_reference_is_current():
    assert crd.readme_reference() == crd.reference_markdown(), "README.md is stale: run `v4d crd --write`"
