"""The deployment plan: everything the Serve app, `v4d serve` and the operator's renderer need.

Produced by `v4d.operator.planner.plan(spec, cfg)`, serialised to JSON (a ConfigMap, the Serve app's
`args`). Plain dataclasses, torch-free; `Plan.from_dict(plan.to_dict()) == plan`.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

from v4d.serving.names import WEIGHTS_DIR_ENV

Vendor = Literal["nvidia", "ascend"]
Role = Literal["attention", "experts"]
RayResource = Literal["GPU", "NPU"]  # the Ray resource a pool's device is declared as


class WeightsNotHere(ValueError):
    """The weights URI names no directory this process can read."""


def weights_dir(uri: str, mounted: str | None) -> str:
    """The checkpoint directory of a weights URI (operator/validate.py checks its form) as this process
    sees it. `mounted`: $V4D_WEIGHTS_DIR, where the operator's pods mount pvc:// and hostpath:// weights
    (operator/render.py); file:// is a path in the image or on this machine; a plain path (the random
    checkpoint `v4d serve` makes) is itself."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    if scheme == "file":
        return rest
    if mounted:
        return mounted
    if scheme == "hostpath":
        return rest  # outside a pod (`v4d serve`): this host's directory
    raise WeightsNotHere(
        f"spec.model.weights.uri: {uri!r} is mounted only in the operator's pods; here give file:///<dir> or "
        "hostpath:///<dir> (a local checkpoint), or no URI for a random-weight checkpoint of a small preset"
    )


def local_weights_dir(uri: str) -> str:
    """`weights_dir` in this process: the mount from its $V4D_WEIGHTS_DIR, if the operator made one."""
    return weights_dir(uri, os.environ.get(WEIGHTS_DIR_ENV))


@dataclass
class PoolPlan:
    name: str
    vendor: Vendor
    resource_name: str  # Kubernetes extended resource, e.g. nvidia.com/gpu or huawei.com/Ascend910
    ray_resource: RayResource
    devices_per_node: int
    device_memory_gib: float
    nodes: int  # nodes this plan uses at `engine.replicas` attention replicas
    devices: int  # devices this plan uses (attention replicas on this pool + expert shards)
    roles: list[Role]
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    image: str | None = None


@dataclass
class EnginePlan:
    pool: str  # the pool attention replicas run on
    devices_per_replica: int
    replicas: int
    min_replicas: int
    max_replicas: int
    kv_budget_bytes: int  # per replica, after dense weights and the working reserve
    capacity_tokens: int  # KV pages x page_tokens per replica
    page_tokens: int
    max_num_seqs: int  # state slots per replica
    max_batch_tokens: int
    max_queue: int
    target_kv_utilization: float
    upscale_delay_s: float
    downscale_delay_s: float
    num_pages: int = 0  # KV pages per replica (capacity_tokens // page_tokens)
    time_to_ready_s: float = 0.0  # autoscaler look-ahead (spec.autoscaling.timeToReadySeconds)
    kv_format: str = "deployed"  # KV storage the engine allocates (fp32 only for exactness tests)
    micro_batches: int = 1  # decode micro-batches per step (spec.serving.microBatches; runtime/runner.py)


@dataclass
class ShardPlan:
    """One expert shard (one device); served by the `v4d.serving.experts.ExpertShard` deployment of this name."""

    name: str  # names.shard_name(pool, i): "experts-<pool>-<i>"
    pool: str
    device: int  # index of the device among this pool's expert devices
    slots: list[list[int]]  # [moe_layer][slot] -> logical expert id
    weight_bytes: int
    capacity: float = 1.0  # capacity weight the balance is measured against (slots per layer)


@dataclass
class ExpertCounts:
    logical: int  # routed experts per MoE layer
    physical: int  # slots per MoE layer over all shards
    redundant: int  # physical - logical


@dataclass
class Balance:
    max_over_mean: float  # worst layer's max/mean of per-device expected load / capacity weight


@dataclass
class KVPlan:
    bytes_per_token: float  # amortised compressed-cache bytes per token, deployed format
    capacity_tokens_per_replica: int


@dataclass
class TransportPlan:
    """What moving tokens to the expert shards and back costs (docs/engine.md "Transport cost").

    Per token and MoE layer, each of its k token-expert pairs moves the hidden row out (FP8, h bytes)
    and the expert's output back (BF16, 2h bytes). Pairs whose shard is on the engine's vendor go
    device to device (NCCL/HCCL); pairs on another vendor's pool go through host memory and the
    network. Link speeds and the decode step are stated assumptions, not measurements."""

    bytes_per_token_layer: int = 0  # k x 3 x hidden
    moe_layers: int = 0
    cross_vendor_share: float = 0.0  # token-expert pairs on another vendor than the engine (slot share)
    device_link_gb_s: float = 0.0  # assumed, one vendor: NCCL/HCCL over NVLink/RDMA
    host_link_gb_s: float = 0.0  # assumed, across vendors: PCIe -> host -> network -> host -> PCIe
    per_token_us: float = 0.0  # bytes x layers over both links, split by the share
    cross_vendor_step_ms: float = 0.0  # cross-vendor transport of one decode step at max_num_seqs
    step_ms: float = 0.0  # assumed decode step the share is taken of


@dataclass
class ServingPlan:
    port: int = 8000
    api_key_secret: dict[str, str] | None = None  # {"name": ..., "key": ...}
    api_key_env: str = "V4D_API_KEY"
    max_queue: int = 256
    request_timeout_s: float = 600.0
    max_request_bytes: int = 8 << 20  # larger request bodies get HTTP 413


@dataclass
class Plan:
    name: str
    served_name: str
    model: str  # preset name, or "custom"
    config: dict[str, Any]  # ModelConfig.to_dict()
    weights_uri: str  # "" -> `v4d serve` makes a random checkpoint
    max_context_tokens: int
    pools: list[PoolPlan]
    engine: EnginePlan
    shards: list[ShardPlan]
    experts: ExpertCounts
    balance: Balance
    kv: KVPlan
    serving: ServingPlan
    warnings: list[str] = field(default_factory=list)
    precision: str = "auto"  # v4d.serving.precision: auto | deployed | bf16 | fp32
    transport: TransportPlan = field(default_factory=TransportPlan)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """The plan of `to_dict()`; a missing or unknown key is a ValueError naming it (`plan.engine.replicas`)."""
        top = _fields(cls, d, "plan", optional=frozenset({"warnings"}))
        return cls(
            **{
                **top,
                "pools": [PoolPlan(**_fields(PoolPlan, p, f"plan.pools[{i}]")) for i, p in enumerate(d["pools"])],
                "engine": EnginePlan(**_fields(EnginePlan, d["engine"], "plan.engine")),
                "shards": [ShardPlan(**_fields(ShardPlan, s, f"plan.shards[{i}]")) for i, s in enumerate(d["shards"])],
                "experts": ExpertCounts(**_fields(ExpertCounts, d["experts"], "plan.experts")),
                "balance": Balance(**_fields(Balance, d["balance"], "plan.balance")),
                "kv": KVPlan(**_fields(KVPlan, d["kv"], "plan.kv")),
                "serving": ServingPlan(**_fields(ServingPlan, d["serving"], "plan.serving")),
                "warnings": list(d.get("warnings", [])),
                "transport": TransportPlan(**d.get("transport", {})),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def pool(self, name: str) -> PoolPlan:
        return next(p for p in self.pools if p.name == name)

    def expert_map(self) -> list[list[list[tuple[str, int]]]]:
        """[moe_layer][logical expert] -> [(shard name, slot index)] over every copy (for routing)."""
        n_layers = len(self.shards[0].slots) if self.shards else 0
        out: list[list[list[tuple[str, int]]]] = [[[] for _ in range(self.experts.logical)] for _ in range(n_layers)]
        for shard in self.shards:
            for layer, slots in enumerate(shard.slots):
                for j, e in enumerate(slots):
                    out[layer][e].append((shard.name, j))
        return out


def _fields(cls: Any, d: Any, path: str, optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    """`d` checked against dataclass `cls`: an object with no unknown keys and every required one."""
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected an object, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{path}.{unknown[0]}: unknown field (expected one of {', '.join(known)})")
    for name, f in known.items():
        required = f.default is MISSING and f.default_factory is MISSING and name not in optional
        if required and name not in d:
            raise ValueError(f"{path}.{name}: missing")
    return d
