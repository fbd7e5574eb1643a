"""Operator benchmark on the local control plane (scripts/kube.sh): time to reconcile N V4Deployments,
API writes per object (from the apiserver's audit log), a forced resync of every object with nothing
changed, and writes per idle minute after convergence (target 0).

    .venv/bin/python bench/operator.py [--n 200] [--idle 60]   # table + bench/results/operator.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from v4d.serving.names import GROUP, PLURAL, VERSION

ROOT = Path(__file__).resolve().parents[1]


def _load(path: str):
    """The tests' control-plane and spec helpers (one implementation for tests and bench)."""
    name = Path(path).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kc = _load("helpers/kubecluster.py")
opspecs = _load("helpers/opspecs.py")

G, V, P = GROUP, VERSION, PLURAL


def breakdown(writes: list[dict]) -> dict[str, int]:
    c = Counter()
    for ev in writes:
        ref = ev.get("objectRef") or {}
        c[f"{ev['verb']} {ref.get('resource')}{'/' + ref['subresource'] if ref.get('subresource') else ''}"] += 1
    return dict(sorted(c.items()))


def settle(cluster, still: float = 5.0) -> None:
    """Until the operator has written nothing for `still` seconds (the tail of the burst)."""
    count, since = len(cluster.writes()), time.monotonic()
    while time.monotonic() - since < still:
        time.sleep(0.5)
        if (now := len(cluster.writes())) != count:
            count, since = now, time.monotonic()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle observation after convergence")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "operator.json"))
    args = ap.parse_args()

    kc.start()
    operator = None
    try:
        cluster = kc.connect_and_install()
        custom = cluster.custom()
        ns = cluster.namespace("bench")
        log = open(ROOT / ".cache" / "kube" / "bench-operator.log", "w")  # noqa: SIM115 - closed below
        operator = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "v4d"),
                "operator",
                "--metrics-port",
                "8403",
                "--metrics-addr",
                "127.0.0.1",
            ],
            env={**os.environ, "KUBECONFIG": str(cluster.operator_kubeconfig)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        time.sleep(3)

        def converged() -> bool:
            items = custom.list_namespaced_custom_object(G, V, ns, P)["items"]
            rss = custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayservices")["items"]
            return len(rss) == args.n and all((o.get("status") or {}).get("phase") == "Deploying" for o in items)

        before = len(cluster.writes())
        t0 = time.monotonic()
        for i in range(args.n):
            custom.create_namespaced_custom_object(G, V, ns, P, opspecs.manifest(f"b{i:04d}"))
        t_created = time.monotonic() - t0
        kc.wait_for(converged, timeout=1800, interval=1, what=f"{args.n} deployments reconciled")
        t_converged = time.monotonic() - t0
        settle(cluster)
        reconcile_writes = cluster.writes()[before:]

        # Resync with nothing to do: touch every RayService (a label the operator does not own).
        before = len(cluster.writes())
        t1 = time.monotonic()
        for i in range(args.n):
            custom.patch_namespaced_custom_object(
                "ray.io", "v1", ns, "rayservices", f"b{i:04d}", {"metadata": {"labels": {"bench/touched": "1"}}}
            )
        time.sleep(5)
        t_touch = time.monotonic() - t1
        resync_writes = cluster.writes()[before:]

        before = len(cluster.writes())
        time.sleep(args.idle)
        idle_writes = cluster.writes()[before:]

        result = {
            "n": args.n,
            "create_seconds": round(t_created, 2),
            "reconcile_seconds": round(t_converged, 2),
            "objects_per_second": round(args.n / t_converged, 2),
            "writes_total": len(reconcile_writes),
            "writes_per_object": round(len(reconcile_writes) / args.n, 2),
            "writes_by_kind": breakdown(reconcile_writes),
            "resync_writes": len(resync_writes),
            "resync_writes_by_kind": breakdown(resync_writes),
            "resync_window_seconds": round(t_touch, 2),
            "idle_seconds": args.idle,
            "writes_per_idle_minute": round(len(idle_writes) * 60.0 / args.idle, 2),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        }
    finally:
        if operator is not None:
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                operator.kill()
        kc.stop()

    rows = [
        ("V4Deployments", f"{result['n']}"),
        ("create (client, serial)", f"{result['create_seconds']:.1f} s"),
        ("all reconciled (first create -> last status)", f"{result['reconcile_seconds']:.1f} s"),
        ("throughput", f"{result['objects_per_second']:.2f} objects/s"),
        ("API writes per object", f"{result['writes_per_object']:.2f}"),
        ("writes on a no-op resync of every object", f"{result['resync_writes']}"),
        ("writes per idle minute (target 0)", f"{result['writes_per_idle_minute']:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("writes by kind:", ", ".join(f"{k}: {v}" for k, v in result["writes_by_kind"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
