"""The V4Deployment CustomResourceDefinition, generated from the API types in `v4d.operator.api`.

The pydantic JSON Schema is rewritten into a structural OpenAPI v3 schema that Kubernetes 1.20
accepts: `$ref`s inlined, `anyOf [T, null]` -> T with `nullable`, numeric `exclusiveMinimum` ->
the boolean OpenAPI 3.0 form, free-form objects -> `x-kubernetes-preserve-unknown-fields`, no
titles, no `additionalProperties: false`, and only non-empty scalar defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from v4d.operator import api
from v4d.serving import names

# Committed copies the tests compare against `render_yaml()` (the chart installs the second).
REPO = Path(__file__).resolve().parents[1]
CRD_FILES = (
    REPO / "manifests" / "crd" / f"{names.GROUP}_{names.PLURAL}.yaml",
    REPO / "charts" / "v4d" / "crds" / f"{names.GROUP}_{names.PLURAL}.yaml",
)
# The README carries `reference_markdown()` between these markers.
README = REPO / "README.md"
REFERENCE_START, REFERENCE_END = "<!-- crd-reference:start -->\n", "<!-- crd-reference:end -->"

_DROP = {"title", "$defs"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:  # inline the definition; the referencing field's description wins
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"cannot express a union of {len(variants)} types in a structural schema")
        inner = variants[0]
        if "$ref" in inner:
            inner = {**defs[inner["$ref"].rsplit("/", 1)[-1]]}
        node = {**inner, **node, "nullable": True}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "default" and (value is None or value == "" or isinstance(value, dict | list)):
            continue
        if key == "additionalProperties":
            if value is False:
                continue
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
                continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
            continue
        if key == "description":
            out[key] = " ".join(value.split())  # docstrings wrap; the schema wants one line
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
            continue
        out[key] = _structural(value, defs)
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of one API model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _structural(raw, raw.get("$defs", {}))
    return schema


def crd() -> dict[str, Any]:
    spec = openapi_schema(api.V4DeploymentSpec)
    spec["description"] = "Desired state: model, accelerator pools, expert placement, replicas, autoscaling, serving."
    status = openapi_schema(api.V4DeploymentStatus)
    status["description"] = "Observed state, written by the v4d operator."
    schema = {
        "type": "object",
        "description": "A DeepSeek-V4-class MoE model served by attention/KV engines and expert shards on Ray Serve.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }
    columns = [
        ("Model", "string", ".spec.model.preset", "Model preset"),
        ("Ready", "integer", ".status.replicas.attention.ready", "Ready attention replicas"),
        ("Desired", "integer", ".status.replicas.attention.desired", "Desired attention replicas"),
        ("KV", "number", ".status.kvCacheUtilization", "Mean KV-cache utilization"),
        ("Phase", "string", ".status.phase", "Lifecycle phase"),
        ("Age", "date", ".metadata.creationTimestamp", None),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{names.PLURAL}.{names.GROUP}"},
        "spec": {
            "group": names.GROUP,
            "names": {
                "kind": names.KIND,
                "listKind": f"{names.KIND}List",
                "plural": names.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": api.CATEGORIES,
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas.attention.ready",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": n, "type": t, "jsonPath": p, **({"description": d} if d else {})}
                        for n, t, p, d in columns
                    ],
                }
            ],
        },
    }


def _rows(node: dict[str, Any], path: str, required: bool) -> list[tuple[str, str, str, str]]:
    kind = node.get("type", "")
    if kind == "array" and node["items"].get("type") == "object":
        kind = "[]object"
    elif kind == "array":
        kind = f"[]{node['items']['type']}"
    elif kind == "object" and "additionalProperties" in node:
        kind = f"map[string]{node['additionalProperties']['type']}"
    rules = []
    enum = node.get("enum") or node.get("items", {}).get("enum")
    if enum:
        rules.append(", ".join(f"`{e}`" for e in enum))
    for key, op in (("minimum", ">"), ("maximum", "<")):
        if key in node:
            strict = node.get(f"exclusive{key[:3].title()}imum") is True
            rules.append(f"{op if strict else op + '='} {node[key]:,}")
    for key, label in (
        ("minItems", "items >="),
        ("maxItems", "items <="),
        ("minLength", "length >="),
        ("maxLength", "length <="),
        ("pattern", "pattern"),
    ):
        if key in node:
            rules.append(f"{label} `{node[key]}`" if key == "pattern" else f"{label} {node[key]}")
    default = "required" if required else (f"`{json.dumps(node['default'])}`" if "default" in node else "")
    meaning = node.get("description", "") + (f" ({', '.join(rules)})" if rules else "")
    out = [(path, kind, default, meaning)]
    children = node.get("properties") or node.get("items", {}).get("properties") or {}
    child_required = set(node.get("required", []) or node.get("items", {}).get("required", []))
    sep = "[]." if kind == "[]object" else "."
    for name, child in children.items():
        out += _rows(child, f"{path}{sep}{name}", name in child_required)
    return out


def reference_markdown() -> str:
    """Field reference of spec and status (a markdown table per part), generated like the CRD."""
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    parts = []
    for part in ("spec", "status"):
        rows = _rows(schema["properties"][part], part, part == "spec")[1:]
        parts.append(
            "| field | type | default | meaning |\n|---|---|---|---|\n"
            + "\n".join(f"| `{p}` | {t} | {d} | {m} |" for p, t, d, m in rows)
        )
    return "\n\n".join(parts) + "\n"


def render_yaml() -> str:
    return "# Generated by `v4d crd --write` from operator/api.py; do not edit.\n" + yaml.safe_dump(
        crd(), sort_keys=False, width=120
    )


def readme_reference() -> str:
    """The field reference block currently in the README."""
    return README.read_text().split(REFERENCE_START, 1)[1].split(REFERENCE_END, 1)[0]


def write_files() -> list[Path]:
    """Rewrite every committed copy: the CRD files and the README's field reference."""
    text = render_yaml()
    for path in CRD_FILES:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    doc = README.read_text()
    README.write_text(
        doc.replace(
            REFERENCE_START + readme_reference() + REFERENCE_END, REFERENCE_START + reference_markdown() + REFERENCE_END
        )
    )
    return [*CRD_FILES, README]
