"""`v4d serve` without Kubernetes: an embedded Ray cluster shaped like the plan's pools.

One Ray node per pool, labelled `v4d.dev/pool=<pool>` as KubeRay labels the pool's worker group and
declaring the pool's devices as Ray resources (GPU / NPU), so replicas claim them exactly as under
KubeRay; without accelerators the claimed replicas compute on the CPU. `build_app` is the same code.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from v4d.serving.names import POOL_LABEL
from v4d.serving.plan import Plan, WeightsNotHere, local_weights_dir
from v4d.serving.runtime.device import node_resources

# Ray on a shared development box (docs/toolchain.md §1.3): no token file, loopback only, no telemetry.
# V4D_TRANSPORT_HOST: the expert channels' gloo address (serving/runtime/channels.py).
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "V4D_TRANSPORT_HOST": "127.0.0.1",
}
NODE_CPUS = 8  # logical CPUs per pool node: room for every replica (0.1 CPU each) the autoscaler adds
APP_NAME = "v4d"


def checkpoint_cache(preset: str) -> Path:
    return Path(os.environ.get("V4D_CACHE", Path.home() / ".cache" / "v4d")) / "checkpoints" / preset


def ensure_checkpoint(plan: Plan, log: Callable[[str], None] = print) -> Plan:
    """With an empty weights URI, make (once, cached) a random-weight checkpoint and point the plan at it."""
    if plan.weights_uri:
        return plan
    from v4d.serving.checkpoint import make_checkpoint
    from v4d.serving.config import ModelConfig

    out = checkpoint_cache(plan.model if plan.model != "custom" else plan.name)
    if not (out / "config.json").exists():
        log(f"making a random-weight {plan.model} checkpoint in {out} ...")
        cfg = ModelConfig.from_dict(plan.config)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        make_checkpoint(cfg, tmp)
        tmp.rename(out)  # complete checkpoints only: an interrupted run leaves no half-written cache
    return replace(plan, weights_uri=str(out))


def metrics_ports(plan: Plan, first: int) -> dict[str, int]:
    """Node ("head", then each pool in manifest order) -> the port Ray exports its metrics on."""
    return {"head": first, **{pool.name: first + i for i, pool in enumerate(plan.pools, start=1)}}


def ports_in_use(ports: dict[str, int], host: str = "127.0.0.1") -> dict[str, int]:
    """Those of `ports` (what -> port) that `host` cannot bind now: a server started there would fail
    minutes later, deep inside Ray, so `v4d serve` checks first. SO_REUSEADDR as servers set it, so a
    port left in TIME_WAIT counts as free."""
    import socket

    busy = {}
    for what, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy[what] = port
    return busy


class PortsInUse(RuntimeError):
    pass


def check_weights(plan: Plan) -> None:
    """Refuse, before anything starts, weights this machine cannot read (the replicas would fail
    minutes later, one traceback each)."""
    from v4d.serving.model.loader import CONFIG_FILE

    wdir = local_weights_dir(plan.weights_uri)
    if not (Path(wdir) / CONFIG_FILE).is_file():
        raise WeightsNotHere(
            f"spec.model.weights.uri: {plan.weights_uri!r}: no {CONFIG_FILE} in {wdir} (not a checkpoint directory)"
        )


@dataclass
class LocalCluster:
    cluster: object  # ray.cluster_utils.Cluster
    metrics_urls: dict[str, str] = field(default_factory=dict)  # node ("head" or pool) -> URL

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.cluster.shutdown()


def start_cluster(plan: Plan, metrics_port: int, attempts: int = 3) -> LocalCluster:
    """Start head + one labelled node per pool, exporting metrics on `metrics_ports(plan, metrics_port)`.

    Ray gives a raylet a fixed 30 s to register; on a saturated machine that can lapse, so a failed
    start is torn down and tried again."""
    os.environ.update(RAY_ENV)
    for attempt in range(1, attempts + 1):
        try:
            return _start_cluster(plan, metrics_port)
        except Exception:
            if attempt == attempts:
                raise


def _start_cluster(plan: Plan, metrics_port: int) -> LocalCluster:
    import ray
    from ray.cluster_utils import Cluster

    # A stand-in node that declares "NPU" makes Ray look for the Ascend runtime to name the chip; on
    # a machine without one it logs a traceback per node. Expected here, so not shown.
    logging.getLogger("ray._private.accelerators.npu").setLevel(logging.CRITICAL)

    ports = metrics_ports(plan, metrics_port)
    cluster = Cluster(shutdown_at_exit=True)
    try:
        cluster.add_node(
            num_cpus=1,
            object_store_memory=200 * 2**20,
            include_dashboard=False,
            metrics_export_port=ports["head"],
            # Ray starts workers at niceness 15, below every ordinary process: on a shared machine
            # the replicas (the whole server) would wait behind unrelated jobs. They are the workload.
            _system_config={"metrics_report_interval_ms": 1000, "worker_niceness": 0},
        )
        for pool in plan.pools:
            cluster.add_node(
                num_cpus=NODE_CPUS,
                object_store_memory=100 * 2**20,
                labels={POOL_LABEL: pool.name},
                metrics_export_port=ports[pool.name],
                **node_resources(plan, pool.name),  # its accelerators, as KubeRay's worker group declares them
            )
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
    except Exception:
        ray.shutdown()
        cluster.shutdown()
        raise
    return LocalCluster(cluster, {node: f"http://127.0.0.1:{port}/metrics" for node, port in ports.items()})


def deploy(plan: Plan, port: int, app_name: str = APP_NAME, api_key: str | None = None) -> None:
    """Start Serve's HTTP proxy on 127.0.0.1:port and run the plan's application (blocks until healthy)."""
    from ray import serve

    from v4d.serving.app import build_app

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    key = api_key or os.environ.get(plan.serving.api_key_env) or None
    serve.run(build_app(plan, api_key=key), name=app_name, route_prefix="/")


def drain(app_name: str = APP_NAME, timeout_s: float = 60.0, give_up: Callable[[], bool] = lambda: False) -> bool:
    """Stop admitting requests and wait for in-flight ones to finish; False if some were still running
    at the deadline or when `give_up()` turned true."""
    from ray import serve

    handle = serve.get_app_handle(app_name)
    deadline = time.monotonic() + timeout_s
    while handle.drain.remote().result() > 0:
        if time.monotonic() > deadline or give_up():
            return False
        time.sleep(0.2)
    return True


def serve_forever(plan: Plan, port: int, log: Callable[[str], None] = print) -> None:
    """Run until SIGINT/SIGTERM, then drain (in-flight streams finish), shut Serve and every Ray process down."""
    # The handler only appends: it runs between two bytecodes of the main thread, wherever that is, so
    # it must take no lock (threading.Event.set there deadlocked when a second Ctrl-C came during the first's).
    signals: list[int] = []

    def catch_stop_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda sig, _frame: signals.append(sig))

    catch_stop_signals()
    metrics = metrics_ports(plan, port + 1)
    wanted = {"the APIs": port, **{f"Ray metrics of {'pool ' * (n != 'head')}{n}": p for n, p in metrics.items()}}
    if busy := ports_in_use(wanted):
        taken = ", ".join(f"{p} ({what})" for what, p in busy.items())
        raise PortsInUse(
            f"port already in use on 127.0.0.1: {taken}. --port P serves the APIs on P and Ray's metrics "
            f"on the {len(metrics)} ports after it"
        )
    plan = ensure_checkpoint(plan, log)
    check_weights(plan)
    log(
        f"starting a local Ray cluster: head + {len(plan.pools)} pool node(s) ({', '.join(p.name for p in plan.pools)})"
    )
    local = start_cluster(plan, port + 1)
    catch_stop_signals()  # again: ray.init's core worker puts its own SIGTERM handler in (it exits at once)
    try:
        if not signals:
            log(
                f"deploying {plan.served_name}: {plan.engine.replicas} engine replica(s), "
                f"{len(plan.shards)} expert shard(s)"
            )
            deploy(plan, port)
            log(f"ready: model {plan.served_name}")
            log(f"  OpenAI API:     http://127.0.0.1:{port}/v1")
            log(f"  Anthropic API:  http://127.0.0.1:{port}  (POST /v1/messages)")
            for node, url in local.metrics_urls.items():
                log(f"  metrics ({node}): {url}")
            log("press Ctrl-C to stop")
        while not signals:
            time.sleep(0.1)
        log("shutting down: finishing in-flight requests (Ctrl-C again: stop now) ...")
        try:
            drain(timeout_s=min(plan.serving.request_timeout_s, 120.0), give_up=lambda: len(signals) > 1)
        except Exception as e:  # the app never came up, or is already gone: nothing to drain
            log(f"  (no drain: {type(e).__name__})")
    finally:
        local.shutdown()
        log("stopped")
