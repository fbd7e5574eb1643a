"""Replicas claim the plan's devices through Ray: Ray's actor table (what the state API reports; read
from the GCS directly, since the local cluster runs no dashboard) shows each replica's required
resources."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def alive_actor_resources() -> list[tuple[str, dict[str, float]]]:
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = state._connect_and_get_accessor().get_actor_table(None, "ALIVE")
    rows = [gcs_pb2.ActorTableData.FromString(raw) for raw in table]
    return [(r.class_name, dict(r.required_resources)) for r in rows]


def test_replicas_claim_their_pools_devices(base_url, plan):
    by_deployment: dict[str, list[dict]] = {}
    for cls, resources in alive_actor_resources():
        if cls.startswith("ServeReplica:v4d:"):
            by_deployment.setdefault(cls.split(":")[-1], []).append(resources)
    engine = by_deployment["engine"]
    assert engine and all(r.get("GPU") == plan.engine.devices_per_replica for r in engine), engine
    pools = {p.name: p for p in plan.pools}
    for shard in plan.shards:
        want = pools[shard.pool].ray_resource
        got = by_deployment[shard.name]
        assert all(r.get(want) == 1 for r in got), (shard.name, got)
        other = {"GPU", "NPU"} - {want}
        assert not any(r.get(o) for r in got for o in other), (shard.name, got)
    # the local cluster declares the pools' devices on their labelled nodes
    import ray

    total = ray.cluster_resources()
    assert total.get("GPU", 0) >= plan.engine.max_replicas * plan.engine.devices_per_replica
    assert total.get("NPU", 0) >= sum(1 for s in plan.shards if pools[s.pool].ray_resource == "NPU")
