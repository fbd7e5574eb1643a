"""`v4d operator` as a process, SIGKILLed at a random point of a burst of creates and restarted:
it converges with exactly one set of children per V4Deployment and no orphans."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter

import pytest
from helpers.kubecluster import stop_process, wait_for
from helpers.opspecs import manifest

from v4d.serving.names import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.apiserver

G, V, P = GROUP, VERSION, PLURAL
CHILD_KINDS = ("RayService", "ConfigMap", "Service", "ServiceAccount", "Role", "RoleBinding")


def start_operator(cluster, log):
    return cluster.start_operator(log, "--metrics-port", "8402", "--metrics-addr", "127.0.0.1")


def owned_children(cluster, ns):
    custom, core = cluster.custom(), cluster.core()
    out = [
        ("RayService", r["metadata"]["name"], r["metadata"]["ownerReferences"][0]["uid"])
        for r in custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayservices")["items"]
    ]
    for kind, items in (
        ("ConfigMap", core.list_namespaced_config_map(ns).items),
        ("Service", core.list_namespaced_service(ns).items),
        ("ServiceAccount", core.list_namespaced_service_account(ns).items),
    ):
        out += [
            (kind, o.metadata.name, o.metadata.owner_references[0].uid) for o in items if o.metadata.owner_references
        ]
    return out


def test_killed_and_restarted_operator_converges(cluster, tmp_path):
    ns = cluster.namespace("kill")
    custom = cluster.custom()
    n = 12
    rng = random.Random(int(time.time()))
    log = tmp_path / "operator.log"
    proc = start_operator(cluster, log)
    try:
        time.sleep(rng.uniform(1.0, 4.0))  # still starting, or mid-burst: both are fair game
        for i in range(n):
            custom.create_namespaced_custom_object(G, V, ns, P, manifest(f"k{i:02d}"))
            if i == n // 2:
                time.sleep(rng.uniform(0.0, 1.5))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        proc = start_operator(cluster, log)
        objs = wait_for(
            lambda: (
                (items := custom.list_namespaced_custom_object(G, V, ns, P)["items"])
                and all((o.get("status") or {}).get("phase") == "Deploying" for o in items)
                and items
            ),
            timeout=180,
            interval=1,
            what="convergence after the restart",
        )
        uids = {o["metadata"]["uid"]: o["metadata"]["name"] for o in objs}
        children = owned_children(cluster, ns)
        assert all(uid in uids for _, _, uid in children), "orphaned children"
        per_kind = Counter(kind for kind, _, _ in children)
        assert per_kind["RayService"] == n and per_kind["Service"] == n
        assert per_kind["ConfigMap"] == 2 * n and per_kind["ServiceAccount"] == n  # plan + autoscaling
        assert len({(k, name) for k, name, _ in children}) == len(children)
        for _kind, name, uid in children:
            assert name.startswith(uids[uid])  # each child belongs to the deployment it is named after
    finally:
        stop_process(proc)
