"""Validation of V4Deployment manifests: the schema of `v4d.operator.api` plus semantic rules.

`validate_spec(spec)` returns every problem as an `Issue(path, message)` whose path names the field
(`spec.pools[1].vendor`); the operator puts them in the `Valid` condition, `v4d validate` prints them.
Semantic rules read the raw dict defensively, so schema and semantic errors are reported together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from v4d.operator import api
from v4d.serving import names
from v4d.serving.config import PRESETS, ModelConfig

# Ports the Ray head of every deployment already binds (GCS, client, dashboard, agent, metrics export).
RAY_PORTS = {
    6379: "Ray GCS",
    10001: "Ray client",
    8265: "Ray dashboard",
    52365: "Ray dashboard agent",
    8080: "Ray metrics export",
}
MAX_NAME = 40  # RayService/Service names derived from it must stay within 63 characters
_PATTERN_HINTS = {
    api.DNS_LABEL: "a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit)",
}
_VENDOR_OF_RESOURCE = {"nvidia.com/": "nvidia", "huawei.com/": "ascend"}


@dataclass(frozen=True)
class Issue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(ValueError):
    """An invalid spec; `issues` lists every problem."""

    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


# -- schema errors ----------------------------------------------------------------------------
def _path(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _message(err: Mapping[str, Any]) -> str:
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    expected_type = {
        "int_type": "an integer",
        "int_from_float": "an integer",
        "float_type": "a number",
        "string_type": "a string",
        "bool_type": "a boolean",
        "dict_type": "an object",
        "list_type": "a list",
        "model_type": "an object",
        "model_attributes_type": "an object",
    }
    if kind in expected_type:
        return f"expected {expected_type[kind]}, got {_type_name(got)} {got!r}"
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"expected one of {', '.join(allowed)}, got {got!r}"
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"must be {op} {ctx[key]:g}, got {got!r}"
    if kind == "string_too_short":
        return (
            "must not be empty" if ctx.get("min_length") == 1 else f"must have at least {ctx['min_length']} characters"
        )
    if kind == "string_too_long":
        return f"must have at most {ctx['max_length']} characters, got {len(got or '')}"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} item(s), got {ctx.get('actual_length', 0)}"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} item(s), got {ctx.get('actual_length')}"
    if kind == "string_pattern_mismatch":
        hint = _PATTERN_HINTS.get(ctx["pattern"], f"a string matching {ctx['pattern']}")
        return f"expected {hint}, got {got!r}"
    return str(err["msg"])


def _schema_issues(spec: Any) -> list[Issue]:
    try:
        api.V4DeploymentSpec.model_validate(spec)
    except ValidationError as e:
        return [Issue(_path("spec", err["loc"]), _message(err)) for err in e.errors()]
    return []


# -- semantic rules ---------------------------------------------------------------------------
def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def resolve_model(model: dict[str, Any]) -> tuple[str, ModelConfig]:
    """(preset name or "custom", ModelConfig) of a spec.model; ValueError as 'key: message'."""
    if model.get("preset") is not None:
        return model["preset"], PRESETS[model["preset"]]
    return "custom", ModelConfig.from_dict(model["config"])


def _config_type_issues(config: dict[str, Any]) -> list[Issue]:
    """Numbers and strings of a custom config.json must have the types of the official keys."""
    issues = []
    for f in fields(ModelConfig):
        if f.name not in config or f.default is MISSING or f.default is None:
            continue
        value, want = config[f.name], type(f.default)
        ok = {
            int: _int(value) is not None,
            float: isinstance(value, int | float) and not isinstance(value, bool),
            bool: isinstance(value, bool),
            str: isinstance(value, str),
        }.get(want, True)
        if not ok:
            name = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}[want]
            issues.append(Issue(f"spec.model.config.{f.name}", f"expected {name}, got {_type_name(value)} {value!r}"))
    return issues


def _model_issues(model: dict[str, Any]) -> list[Issue]:
    issues: list[Issue] = []
    preset, config = model.get("preset"), model.get("config")
    if preset is None and config is None:
        return [Issue("spec.model", "set one of preset or config")]
    if preset is not None and config is not None:
        return [Issue("spec.model", "set only one of preset and config")]
    cfg = None
    if isinstance(preset, str):
        if preset not in PRESETS:
            issues.append(
                Issue("spec.model.preset", f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
            )
        else:
            cfg = PRESETS[preset]
    elif isinstance(config, dict):
        issues += _config_type_issues(config)
        if not issues:
            try:
                cfg = ModelConfig.from_dict(config)
            except (ValueError, TypeError) as e:
                key, sep, msg = str(e).partition(": ")
                issues.append(
                    Issue(f"spec.model.config.{key}", msg)
                    if sep and " " not in key
                    else Issue("spec.model.config", str(e))
                )
    ctx = _int(model.get("maxContextTokens"))
    if cfg is not None and ctx is not None and ctx > cfg.max_position_embeddings:
        issues.append(
            Issue(
                "spec.model.maxContextTokens",
                f"{ctx} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}",
            )
        )
    uri = _dict(model.get("weights")).get("uri")
    if isinstance(uri, str) and uri:
        issues += [Issue("spec.model.weights.uri", m) for m in _uri_problems(uri)]
    return issues


def _uri_problems(uri: str) -> list[str]:
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return [f"expected pvc://<claim>/<path>, hostpath:///<path> or file:///<path>, got {uri!r}"]
    if scheme not in api.WEIGHT_SCHEMES:
        return [
            f"scheme {scheme + '://'!r} is not supported yet; expected pvc://, hostpath:// or file:// "
            "(copy the checkpoint into a PVC first)"
        ]
    if scheme == "pvc":
        claim = rest.split("/", 1)[0]
        if not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", claim):
            return [f"pvc:// needs a claim name first (pvc://<claim>/<path>), got {claim!r}"]
        return []
    if not rest.startswith("/") or rest == "/":
        return [f"{scheme}:// needs an absolute path, e.g. {scheme}:///models/deepseek-v4, got {uri!r}"]
    return []


def _pool_issues(pools: list[Any]) -> list[Issue]:
    issues: list[Issue] = []
    seen: dict[str, int] = {}
    attention_pools: list[int] = []
    roles_present: set[str] = set()
    for i, pool in enumerate(pools):
        pool = _dict(pool)
        name = pool.get("name")
        if isinstance(name, str):
            if name in seen:
                issues.append(
                    Issue(
                        f"spec.pools[{i}].name",
                        f"duplicate pool name {name!r} (also spec.pools[{seen[name]}])",
                    )
                )
            seen.setdefault(name, i)
        roles = [r for r in _list(pool.get("roles")) if isinstance(r, str)]
        for r in sorted({r for r in roles if roles.count(r) > 1}):
            issues.append(Issue(f"spec.pools[{i}].roles", f"role {r!r} listed twice"))
        roles_present.update(roles)
        if "attention" in roles:
            attention_pools.append(i)
        resource, vendor = pool.get("resourceName"), pool.get("vendor")
        if isinstance(resource, str) and vendor in ("nvidia", "ascend"):
            for prefix, owner in _VENDOR_OF_RESOURCE.items():
                if resource.startswith(prefix) and owner != vendor:
                    issues.append(
                        Issue(
                            f"spec.pools[{i}].resourceName",
                            f"{resource!r} is a {owner} resource but the pool's vendor is {vendor!r}",
                        )
                    )
        for j, tol in enumerate(_list(pool.get("tolerations"))):
            tol = _dict(tol)
            path = f"spec.pools[{i}].tolerations[{j}]"
            if tol.get("operator") == "Exists" and tol.get("value"):
                issues.append(Issue(f"{path}.value", "must be empty when operator is Exists"))
            if not tol.get("key") and tol.get("operator", "Equal") == "Equal":
                issues.append(Issue(f"{path}.operator", "must be Exists when key is empty"))
    if pools and all(isinstance(p, dict) and isinstance(p.get("roles"), list) for p in pools):
        for role, why in (("attention", "attention/KV engines"), ("experts", "expert shards")):
            if role not in roles_present:
                issues.append(Issue("spec.pools", f"no pool has role {role!r}; {why} need one"))
    if len(attention_pools) > 1:
        names = [_dict(pools[i]).get("name") for i in attention_pools]
        issues.append(
            Issue(
                f"spec.pools[{attention_pools[1]}].roles",
                f"attention runs on one pool only; pools {', '.join(map(repr, names))} all have it",
            )
        )
    return issues


def _scaling_issues(spec: dict[str, Any]) -> list[Issue]:
    issues: list[Issue] = []
    auto = _dict(spec.get("autoscaling"))
    lo, hi = _int(auto.get("minReplicas", 1)), _int(auto.get("maxReplicas", 1))
    if lo is not None and hi is not None and lo > hi:
        issues.append(Issue("spec.autoscaling.minReplicas", f"must be <= maxReplicas ({lo} > {hi})"))
    replicas = _int(spec.get("replicas"))  # unset: the planner starts at minReplicas
    if (
        auto.get("enabled") is True
        and lo is not None
        and hi is not None
        and replicas is not None
        and lo <= hi
        and not lo <= replicas <= hi
    ):
        issues.append(
            Issue(
                "spec.replicas",
                f"{replicas} is outside autoscaling [minReplicas, maxReplicas] = [{lo}, {hi}]",
            )
        )
    serving = _dict(spec.get("serving"))
    port = _int(serving.get("port"))
    if port in RAY_PORTS:
        issues.append(Issue("spec.serving.port", f"{port} is taken by the {RAY_PORTS[port]} on every Ray head"))
    seqs, batch = _int(serving.get("maxNumSeqs", 64)), _int(serving.get("maxBatchTokens", 8192))
    if seqs is not None and batch is not None and batch < seqs:
        issues.append(
            Issue(
                "spec.serving.maxBatchTokens",
                f"must be >= maxNumSeqs ({batch} < {seqs}): every running sequence decodes a token per step",
            )
        )
    return issues


def validate_spec(spec: Any) -> list[Issue]:
    """Every problem of a V4Deployment spec (schema first, then semantic rules), in a stable order."""
    if not isinstance(spec, dict):
        return [Issue("spec", f"expected an object, got {_type_name(spec)}")]
    issues = _schema_issues(spec)
    if isinstance(spec.get("model"), dict):
        issues += _model_issues(spec["model"])
    issues += _pool_issues(_list(spec.get("pools")))
    issues += _scaling_issues(spec)
    return list(dict.fromkeys(issues))


def validate_manifest(doc: Any) -> list[Issue]:
    """A whole V4Deployment object: apiVersion, kind, metadata.name, then the spec."""
    if not isinstance(doc, dict):
        return [Issue("(document)", f"expected a V4Deployment object, got {_type_name(doc)}")]
    issues: list[Issue] = []
    if doc.get("apiVersion") != names.API_VERSION:
        issues.append(Issue("apiVersion", f"expected {names.API_VERSION!r}, got {doc.get('apiVersion')!r}"))
    if doc.get("kind") != names.KIND:
        issues.append(Issue("kind", f"expected {names.KIND!r}, got {doc.get('kind')!r}"))
    name = _dict(doc.get("metadata")).get("name")
    if not isinstance(name, str) or not re.match(api.DNS_LABEL, name) or len(name) > MAX_NAME:
        issues.append(Issue("metadata.name", f"expected a DNS label of at most {MAX_NAME} characters, got {name!r}"))
    if "spec" not in doc:
        return issues + [Issue("spec", "required field is missing")]
    return issues + validate_spec(doc["spec"])


def parse_spec(spec: dict[str, Any]) -> api.V4DeploymentSpec:
    """The typed spec, or SpecError listing every issue."""
    issues = validate_spec(spec)
    if issues:
        raise SpecError(issues)
    return api.V4DeploymentSpec.model_validate(spec)


def load_manifest(path: str | Path) -> tuple[str, api.V4DeploymentSpec]:
    """(metadata.name, typed spec) of a manifest file; SpecError on any problem."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise SpecError([Issue("(document)", f"not valid YAML: {e}")]) from None
    issues = validate_manifest(doc)
    if issues:
        raise SpecError(issues)
    return doc["metadata"]["name"], api.V4DeploymentSpec.model_validate(doc["spec"])
