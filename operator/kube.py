"""Kubernetes API access for the operator: read, server-side apply, status patch, with every write
counted. Plain REST paths over `kubernetes.client.ApiClient`, so one code path serves every kind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from v4d.serving.names import API_VERSION, KIND, MANAGED_BY, PLURAL

FIELD_MANAGER = MANAGED_BY

# kind -> (API path prefix, plural); all our children are namespaced.
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "RayService": ("/apis/ray.io/v1", "rayservices"),
    "PodMonitor": ("/apis/monitoring.coreos.com/v1", "podmonitors"),
    KIND: (f"/apis/{API_VERSION}", PLURAL),
}


def path(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    prefix, plural = KINDS[kind]
    p = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        p += f"/{name}"
    if sub:
        p += f"/{sub}"
    return p


def contains(live: Any, want: Any, ignore: frozenset[str] = frozenset()) -> bool:
    """True when every field of `want` is in `live` with the same value (lists element by element),
    skipping dict keys named in `ignore`. The apiserver adds defaults and other managers add
    fields; neither counts as drift."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(
            k in ignore or (k in live and contains(live[k], v, ignore)) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(live, list)
            and len(live) == len(want)
            and all(contains(a, b, ignore) for a, b in zip(live, want, strict=True))
        )
    return live == want


def request(
    api: client.ApiClient,
    method: str,
    url: str,
    body: Any = None,
    content_type: str | None = None,
    query: list[tuple[str, str]] | None = None,
) -> dict[str, Any] | None:
    """One REST call; the decoded JSON body, or ApiException on a non-2xx status."""
    headers = {"Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    params = api.param_serialize(
        method, url, query_params=query or [], header_params=headers, body=body, auth_settings=["BearerToken"]
    )
    resp = api.call_api(*params)
    data = resp.read()
    if not 200 <= resp.status <= 299:
        raise ApiException.from_response(http_resp=resp, body=data.decode("utf-8", "replace"), data=None)
    return json.loads(data or b"null")


class Kube:
    """Synchronous API access; `on_write(kind)` is called once per write request."""

    def __init__(self, api: client.ApiClient, on_write: Callable[[str], None] = lambda kind: None):
        self.api = api
        self.on_write = on_write

    def _call(
        self,
        method: str,
        url: str,
        body: Any = None,
        content_type: str | None = None,
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any] | None:
        try:
            return request(self.api, method, url, body, content_type, query)
        except ApiException as exc:
            if exc.status == 404 and method == "GET":
                return None
            raise

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call("GET", path(kind, namespace, name))

    def list(self, kind: str, namespace: str, label_selector: str = "") -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        return (self._call("GET", path(kind, namespace), query=query) or {}).get("items", [])

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply under our field manager; `force` takes back fields others changed."""
        meta = obj["metadata"]
        self.on_write(obj["kind"])
        return self._call(
            "PATCH",
            path(obj["kind"], meta["namespace"], meta["name"]),
            body=obj,
            content_type="application/apply-patch+yaml",
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
        )

    @staticmethod
    def holds(live: Any, want: Any, ignore: tuple[str, ...] = ()) -> bool:
        return contains(live, want, frozenset(ignore))

    def create_event(self, event: dict[str, Any]) -> None:
        self.on_write("Event")
        self._call(
            "POST",
            f"/api/v1/namespaces/{event['metadata']['namespace']}/events",
            body=event,
            content_type="application/json",
        )

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.on_write(f"{kind}/status")
        return self._call(
            "PATCH",
            path(kind, namespace, name, "status"),
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def has_api(self, group_version: str, kind: str) -> bool:
        """Whether the server serves `kind` in `group_version` (e.g. a Prometheus Operator CRD)."""
        try:
            res = self._call("GET", f"/apis/{group_version}")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("kind") == kind for r in (res or {}).get("resources", []))
