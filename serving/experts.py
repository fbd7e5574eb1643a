"""Expert shards: one Serve deployment per planned shard, holding its routed experts of every MoE layer.

A shard's experts come from the checkpoint through the subset loader (only its experts are read).
Any engine sends it (layer, x[T,d], local ids[T,k], weights[T,k]) with ids indexing the shard's
slots of that layer (-1 = not here); it returns the weighted sum of its experts' outputs, over its
direct channels (serving/runtime/channels.py: registered at the app's rendezvous actor at start-up)
or, as a fallback, through its Serve handle. It counts the token-expert pairs it serves per layer,
for metrics and for its own autoscaling.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch

from v4d.kernels import ops
from v4d.kernels.quant import FP4_GROUP
from v4d.serving.autoscale import EXPERT_TOKENS_PER_S, ExpertLoadPolicy, autoscaling_config
from v4d.serving.config import ModelConfig
from v4d.serving.metrics import ServingMetrics, plan_labels
from v4d.serving.names import POOL_LABEL
from v4d.serving.plan import Plan, local_weights_dir
from v4d.serving.precision import resolve_precision
from v4d.serving.runtime.channels import ShardEndpoint, rendezvous, rendezvous_name
from v4d.serving.runtime.device import ray_options, torch_device

EXPORT_S = 1.0  # how often a shard adds the tokens it served to the expert_tokens metric


def expert_prefix(cfg: ModelConfig, layer: int) -> str:
    """Official tensor-name prefix of MoE layer `layer` (main layer i, or num_hidden_layers + k for MTP k)."""
    L = cfg.num_hidden_layers
    return f"layers.{layer}" if layer < L else f"mtp.{layer - L}"


class ShardExperts:
    """Stacked w1/w3/w2 [slots, ...] per MoE layer for one shard's slot map ([layer][slot] -> expert).

    In deployed precision the stacks hold packed MXFP4 (int8 [slots, out, in/2]) with their UE8M0
    scales, as the checkpoint stores routed experts; otherwise decoded values of `dtype`."""

    def __init__(
        self,
        cfg: ModelConfig,
        slots: list[list[int]],
        tensors: Mapping[str, torch.Tensor] | None = None,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
    ):
        """`tensors`: decoded values by official name to fill the stacks with (else read them with
        `from_checkpoint`)."""
        self.cfg, self.slots = cfg, [list(map(int, s)) for s in slots]
        device = torch.device(device)
        self.precision = resolve_precision(precision, device.type)
        d, inter = cfg.hidden_size, cfg.moe_intermediate_size
        self.weights: dict[int, tuple[torch.Tensor, ...]] = {}
        for layer, experts in enumerate(self.slots):
            if not experts:
                continue
            n, shapes = len(experts), ((inter, d), (inter, d), (d, inter))
            if self.precision == "deployed":
                w = [torch.empty(n, o, i // 2, dtype=torch.int8, device=device) for o, i in shapes]
                sc = [torch.empty(n, o, i // FP4_GROUP, dtype=torch.float8_e8m0fnu, device=device) for o, i in shapes]
                self.weights[layer] = (*w, *sc)
            else:
                dtype = torch.float32 if self.precision == "fp32" else torch.bfloat16
                self.weights[layer] = tuple(torch.empty(n, o, i, dtype=dtype, device=device) for o, i in shapes)
        if tensors is not None:
            if self.precision == "deployed":
                raise ValueError(
                    "ShardExperts: decoded tensors fill bf16/fp32 stacks; read deployed ones with from_checkpoint"
                )
            for name, dst in self.destinations().items():
                dst.copy_(tensors[name])
            self._fill_copies()

    def destinations(self) -> dict[str, torch.Tensor]:
        """Official tensor name -> the slice of a stack it is read into (scales under `X.scale`); an
        expert held in several slots of a layer is read into the first (`_fill_copies` does the rest)."""
        dest = {}
        for layer, stacks in self.weights.items():
            p = expert_prefix(self.cfg, layer)
            for slot, e in enumerate(self.slots[layer]):
                if self.slots[layer].index(e) != slot:
                    continue
                for j, w in enumerate(("w1", "w3", "w2")):
                    dest[f"{p}.ffn.experts.{e}.{w}.weight"] = stacks[j][slot]
                    if len(stacks) == 6:
                        dest[f"{p}.ffn.experts.{e}.{w}.scale"] = stacks[3 + j][slot]
        return dest

    def _fill_copies(self) -> None:
        for layer, stacks in self.weights.items():
            experts = self.slots[layer]
            for slot, e in enumerate(experts):
                first = experts.index(e)
                if first != slot:
                    for t in stacks:
                        t[slot].copy_(t[first])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for stacks in self.weights.values() for t in stacks)

    @classmethod
    def from_checkpoint(
        cls,
        cfg: ModelConfig,
        slots: list[list[int]],
        path: str,
        precision: str = "auto",
        device: str | torch.device = "cpu",
    ) -> ShardExperts:
        from v4d.serving.model.loader import Checkpoint, read_into

        shard = cls(cfg, slots, precision=precision, device=device)
        read_into(Checkpoint(path), shard.destinations(), progress=False)
        shard._fill_copies()
        return shard

    def compute(self, layer: int, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The weighted sum of this shard's experts over `local_ids` ([T,k] slots of `layer`, -1 = not
        here). The ids' range is checked after the math is launched (on a device the check's sync then
        waits behind it, where the reply's would anyway): an engine whose slot map differs from this
        shard's (a rollout in between) gets an error, not rows missing the experts it meant."""
        stacks = self.weights.get(layer)
        if stacks is None:
            raise ValueError(f"layer {layer}: this shard holds no experts of it")
        w1, w3, w2, *scales = stacks
        dev = w1.device
        local_ids = local_ids.to(dev)
        y = ops.moe_experts(
            x.to(dev), local_ids, weights.to(dev), w1, w3, w2, self.cfg.swiglu_limit, tuple(scales) or None
        )
        n = len(self.slots[layer])
        if local_ids.numel() and (top := int(local_ids.max())) >= n:
            raise ValueError(f"local_ids: layer {layer} has {n} slots here, got id {top}")
        return y.to(x.device)


class ExpertShard:
    """Serve deployment body for one shard (bind one per shard with `bind_shards`)."""

    def __init__(self, plan: Plan, shard: str, weights_dir: str, window_s: float = 10.0):
        torch.set_num_threads(1)
        cfg = ModelConfig.from_dict(plan.config)
        spec = next(s for s in plan.shards if s.name == shard)
        self.name, self.window_s = shard, window_s
        device = torch_device(plan.pool(spec.pool).vendor)
        self.experts = ShardExperts.from_checkpoint(cfg, spec.slots, weights_dir, plan.precision, device)
        self.tokens: dict[int, int] = {}  # token-expert pairs served per layer
        self.calls, self.compute_s = 0, 0.0  # calls served and the seconds spent in their expert math
        self.recent: deque[tuple[float, int]] = deque()
        self.lock = threading.Lock()  # each pair's tags call `compute` from threads of their own
        self.metrics = ServingMetrics(role="experts", **plan_labels(plan, spec.pool))
        self.endpoint = ShardEndpoint(rendezvous(rendezvous_name(plan.name)), shard, self.compute, device=device.type)
        self.metrics.ready()
        threading.Thread(target=self._export, name=f"v4d-metrics-{shard}", daemon=True).start()

    def __del__(self) -> None:  # Serve's replica shutdown: leave the rendezvous so engines re-pair
        endpoint = getattr(self, "endpoint", None)
        if endpoint is not None:
            endpoint.close()

    def compute(self, layer: int, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One call from an engine (the channels' hot path: counting only; `_export` records the metric)."""
        t0 = time.perf_counter()
        y = self.experts.compute(layer, x, local_ids, weights)
        dt = time.perf_counter() - t0
        n = int((local_ids >= 0).sum())  # after the math is launched: ids on a device sync behind it, not before
        with self.lock:
            self.tokens[layer] = self.tokens.get(layer, 0) + n
            self.recent.append((time.monotonic(), n))
            self.calls, self.compute_s = self.calls + 1, self.compute_s + dt
        return y

    def _export(self) -> None:
        """Add what each layer served since the last round to `expert_tokens` every EXPORT_S (a Ray
        metric update is about 7 us of Python: per call, it would add to every layer of every step)."""
        counted: dict[int, int] = {}  # the part of `tokens` already added
        while not self.endpoint.stopped.wait(EXPORT_S):  # until the replica shuts down (`__del__`)
            with self.lock:
                tokens = dict(self.tokens)
            for layer, n in tokens.items():
                if new := n - counted.get(layer, 0):
                    self.metrics.expert_tokens.inc(new, tags={"shard": self.name, "layer": str(layer)})
                    counted[layer] = n

    def tokens_per_s(self) -> float:
        cutoff = time.monotonic() - self.window_s
        with self.lock:
            while self.recent and self.recent[0][0] < cutoff:
                self.recent.popleft()
            return sum(n for _, n in self.recent) / self.window_s

    def stats(self) -> dict[str, Any]:
        with self.lock:
            tokens = dict(self.tokens)
        return {
            "shard": self.name,
            "tokens_per_layer": tokens,
            "tokens_per_s": self.tokens_per_s(),
            "calls": self.calls,
            "compute_seconds": self.compute_s,
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {EXPERT_TOKENS_PER_S: self.tokens_per_s()}


def pool_actor_options(plan: Plan, pool: str, devices: int, num_cpus: float = 0.1) -> dict[str, Any]:
    """Place a replica on its pool's nodes (Ray node label `v4d.dev/pool`, set locally and by KubeRay)
    and claim `devices` of the pool's accelerators (`num_gpus` / the `NPU` resource)."""
    return {"num_cpus": num_cpus, "label_selector": {POOL_LABEL: pool}, **ray_options(plan.pool(pool), devices)}


def bind_shards(
    plan: Plan, weights_dir: str, target_tokens_per_s: float = 2000.0, place: bool = True
) -> dict[str, Any]:
    """One bound Serve application per planned shard, named after it, scaling on its token load
    with the engine's replica ceiling and delays."""
    from ray import serve

    eng = plan.engine
    apps = {}
    for spec in plan.shards:
        dep = serve.deployment(ExpertShard, name=spec.name)
        options: dict[str, Any] = {
            "autoscaling_config": autoscaling_config(
                ExpertLoadPolicy,
                1,
                max(1, eng.max_replicas),
                1,
                target_tokens_per_s=target_tokens_per_s,
                upscale_delay_s=eng.upscale_delay_s,
                downscale_delay_s=eng.downscale_delay_s,
            ),
            "graceful_shutdown_wait_loop_s": 0.1,
            "graceful_shutdown_timeout_s": 1.0,
        }
        if place:
            options["ray_actor_options"] = pool_actor_options(plan, spec.pool, devices=1)
        apps[spec.name] = dep.options(**options).bind(plan, spec.name, weights_dir)
    return apps


def shard_app_builder(args: dict[str, Any]) -> Any:
    """Serve app builder for one shard deployed as its own app (serveConfigV2 `import_path:
    v4d.serving.experts:shard_app_builder`, `args: {"plan": <plan dict>, "shard": <name>}`); the engine
    then runs with `bind_engine(..., shard_apps=True)`."""
    plan = Plan.from_dict(args["plan"])
    return bind_shards(plan, local_weights_dir(plan.weights_uri))[args["shard"]]
