"""The V4Deployment API (group/version/kind in `v4d.serving.names`): the one source of truth.

Typed pydantic models for spec and status. `v4d.operator.crd` turns them into the CRD's OpenAPI
schema (field docstrings become descriptions), `v4d.operator.validate` checks manifests against
them plus the semantic rules a schema cannot express. Field names are the manifest's (camelCase).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from v4d.serving.names import STATUS_SCALING_HISTORY

SINGULAR = "v4deployment"
SHORT_NAMES = ["v4d"]
CATEGORIES = ["v4d", "serving"]

Vendor = Literal["nvidia", "ascend"]
Role = Literal["attention", "experts"]
# Extended resource names Kubernetes device plugins register; Ascend names vary by install
# (huawei.com/Ascend910, huawei.com/Ascend910B, huawei.com/npu, ...), so pools may override them.
DEFAULT_RESOURCE: dict[str, str] = {"nvidia": "nvidia.com/gpu", "ascend": "huawei.com/Ascend910"}
WEIGHT_SCHEMES = ("pvc", "hostpath", "file")
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class _Model(BaseModel):
    # strict: a string "3" is not an integer, as on the apiserver; unknown fields are errors, not pruned.
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True, populate_by_name=True)


# -- spec -------------------------------------------------------------------------------------
class WeightsSpec(_Model):
    uri: str = ""
    """Checkpoint location: pvc://<claim>/<path>, hostpath:///<node path> or file:///<path in the image>.
    Empty makes a random-weight checkpoint (local runs and tests). s3://, gs://, hf:// are not supported yet:
    copy the checkpoint into a PVC first."""


class ModelSpec(_Model):
    preset: str | None = None
    """Built-in model: deepseek-v4-flash, deepseek-v4-pro, v4-tiny or v4-tiny-fast. Exactly one of preset and config."""
    config: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """A full HF-style config.json (official key names) for a custom DeepSeek-V4-class model."""
    weights: WeightsSpec = Field(default_factory=WeightsSpec)
    """Where the checkpoint comes from."""
    servedName: str | None = Field(default=None, min_length=1)
    """Model id in the OpenAI/Anthropic APIs; defaults to the preset name (or the resource name)."""
    maxContextTokens: int = Field(default=131072, ge=1, le=1048576)
    """Longest sequence (prompt + output) a request may have; the planner warns if a replica's KV cache holds less."""
    precision: Literal["auto", "deployed", "bf16", "fp32"] = "auto"
    """Weights and activations in the replicas: deployed keeps the checkpoint's FP8 and MXFP4 weights (what the plan budgets), bf16 or fp32 decode them at load; auto is deployed on accelerators, fp32 on CPU-only nodes."""  # noqa: E501 (one line: the CRD's description)


class Toleration(_Model):
    key: str | None = None
    """Taint key the toleration applies to; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists matches any value; Equal requires value to match."""
    value: str | None = None
    """Taint value to match when operator is Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    tolerationSeconds: int | None = Field(default=None, ge=0)
    """How long a NoExecute taint is tolerated before eviction."""


class PoolSpec(_Model):
    name: str = Field(pattern=DNS_LABEL, max_length=32)
    """Pool name (DNS label); shards are named experts-<pool>-<i> and Ray nodes carry the label v4d.dev/pool=<pool>."""
    vendor: Vendor
    """Accelerator vendor: nvidia (GPUs) or ascend (Huawei Ascend NPUs)."""
    resourceName: str | None = Field(default=None, pattern=r"^[a-z0-9.-]+/[A-Za-z0-9._-]+$")
    """Kubernetes extended resource of one device; defaults to nvidia.com/gpu or huawei.com/Ascend910."""
    devicesPerNode: int = Field(ge=1, le=64)
    """Accelerators per node of this pool."""
    deviceMemoryGiB: float = Field(gt=0, le=4096)
    """Memory of one accelerator in GiB (H200: 141, H100: 80, Ascend 910B: 64)."""
    maxNodes: int = Field(ge=1, le=1024)
    """Most nodes of this pool the deployment may use."""
    roles: list[Role] = Field(min_length=1, max_length=2)
    """What runs here: attention (attention/KV engine replicas), experts (routed-expert shards), or both."""
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pool's pods must match."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Tolerations for the pool's pods (accelerator nodes are usually tainted)."""
    image: str | None = Field(default=None, min_length=1)
    """Container image for this pool (e.g. a CANN image on Ascend); defaults to the operator's serving image."""


class ParallelismSpec(_Model):
    redundantExperts: int = Field(default=0, ge=0, le=4096)
    """Extra physical copies of routed experts per MoE layer, given to the most loaded experts (EPLB)."""
    expertParallelSize: int | None = Field(default=None, ge=1, le=4096)
    """Fixed number of expert devices over all expert pools; by default the fewest that hold every slot."""


class AutoscalingSpec(_Model):
    enabled: bool = False
    """Scale attention replicas on KV-cache pressure."""
    minReplicas: int = Field(default=1, ge=1, le=1024)
    """Fewest attention replicas."""
    maxReplicas: int = Field(default=1, ge=1, le=1024)
    """Most attention replicas."""
    targetKVCacheUtilization: float = Field(default=0.7, gt=0, lt=1)
    """KV-cache utilization (0-1, exclusive) the autoscaler keeps each replica near."""
    upscaleStabilizationSeconds: int = Field(default=30, ge=0, le=86400)
    """Pressure must last this long before scaling up."""
    downscaleStabilizationSeconds: int = Field(default=300, ge=0, le=86400)
    """Pressure must stay low this long before scaling down."""
    timeToReadySeconds: int = Field(default=0, ge=0, le=3600)
    """How long a new attention replica takes to serve (node, image, weights). The autoscaler projects
    the KV-cache trend this far ahead and scales when the projection crosses the target; 0 reacts to
    the current utilization only."""


class SecretKeyRef(_Model):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)
    """Secret name in the deployment's namespace."""
    key: str = Field(min_length=1, pattern=r"^[-._a-zA-Z0-9]+$")
    """Key in the Secret holding the API key."""


class ServingSpec(_Model):
    port: int = Field(default=8000, ge=1, le=65535)
    """HTTP port of the OpenAI/Anthropic-compatible ingress."""
    apiKeySecretRef: SecretKeyRef | None = None
    """Secret key holding the bearer API key clients must send; no key means no authentication."""
    maxNumSeqs: int = Field(default=64, ge=1, le=4096)
    """Most sequences one attention replica runs at once (its KV state slots)."""
    maxBatchTokens: int = Field(default=8192, ge=1, le=1048576)
    """Most tokens (prefill chunks + decode) one engine step processes."""
    maxQueue: int = Field(default=256, ge=0, le=1000000)
    """Requests waiting per replica beyond which new ones get HTTP 429."""
    requestTimeoutSeconds: int = Field(default=600, ge=1, le=86400)
    """End-to-end limit of one request."""
    maxRequestBytes: int = Field(default=8 << 20, ge=1024, le=1 << 30)
    """Largest request body the ingress reads; bigger ones get HTTP 413 (default 8 MiB)."""
    microBatches: int = Field(default=1, ge=1, le=2)
    """Decode micro-batches per engine step: 2 splits each decode batch in halves so one half's attention
    runs while the other's tokens are on the expert shards (pays only when experts are remote)."""


class V4DeploymentSpec(_Model):
    model: ModelSpec
    """The model to serve."""
    pools: list[PoolSpec] = Field(min_length=1, max_length=16)
    """Accelerator pools; attention replicas and expert shards may live on different pools and vendors."""
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    """Expert placement knobs."""
    replicas: int | None = Field(default=None, ge=0, le=1024)
    """Attention engine replicas (the /scale subresource); unset means autoscaling.minReplicas when
    autoscaling is enabled, else 1. With autoscaling it must lie within [minReplicas, maxReplicas]."""
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    """KV-pressure autoscaling of attention replicas."""
    serving: ServingSpec = Field(default_factory=ServingSpec)
    """HTTP ingress and batching limits."""


# -- status -----------------------------------------------------------------------------------
Phase = Literal["Pending", "Planning", "Deploying", "Ready", "Degraded", "Failed"]
# The conditions the operator sets (v4d.operator.status), in the order status lists them.
ConditionType = Literal["Invalid", "Planned", "CapacityLimited", "Progressing", "Ready", "Degraded"]
CONDITIONS: tuple[str, ...] = get_args(ConditionType)


class Condition(_Model):
    type: ConditionType
    """Condition type."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = ""
    """CamelCase machine-readable reason."""
    message: str = ""
    """Human-readable detail."""
    lastTransitionTime: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    """When status last changed (RFC 3339)."""
    observedGeneration: int | None = Field(default=None, ge=0)
    """metadata.generation the condition was computed for."""


class PlanSummary(_Model):
    model: str = ""
    """Served model (preset or custom)."""
    devices: dict[str, int] = Field(default_factory=dict)
    """Devices the plan uses per pool."""
    expertSlots: int = 0
    """Physical expert slots per MoE layer over all shards."""
    redundantExperts: int = 0
    """Physical slots beyond the logical experts."""
    expertShards: int = 0
    """Expert shard deployments (one per expert device)."""
    tokenCapacityPerReplica: int = 0
    """KV-cache capacity of one attention replica in tokens."""
    maxOverMean: float = 0.0
    """Worst MoE layer's max/mean expected device load per capacity (1.0 is perfect)."""
    transportPerTokenMicroseconds: float = 0.0
    """Expert dispatch + combine time of one token over all MoE layers, at the assumed links."""
    crossVendorShare: float = 0.0
    """Share of token-expert pairs whose shard is on another vendor than the attention engines."""
    transportAssumption: str = ""
    """The links and decode step the transport figures assume."""
    warnings: list[str] = Field(default_factory=list)
    """Planner warnings."""


class RoleReplicas(_Model):
    desired: int = Field(default=0, ge=0)
    """Replicas wanted."""
    ready: int = Field(default=0, ge=0)
    """Replicas serving."""


class ReplicasStatus(_Model):
    attention: RoleReplicas = Field(default_factory=RoleReplicas)
    """Attention/KV engine replicas."""
    experts: RoleReplicas = Field(default_factory=RoleReplicas)
    """Expert shard replicas."""


class ScalingEvent(_Model):
    time: str = Field(json_schema_extra={"format": "date-time"})
    """When the decision was applied (RFC 3339)."""
    from_: int = Field(alias="from", ge=0)
    """Attention replicas before."""
    to: int = Field(ge=0)
    """Attention replicas after."""
    reason: str
    """Why (e.g. KVPressureHigh, KVPressureLow, ManualScale)."""
    kvCacheUtilization: float | None = Field(default=None, ge=0)
    """Mean KV-cache utilization that drove the decision."""
    waitingRequests: int | None = Field(default=None, ge=0)
    """Queued requests at decision time."""


class V4DeploymentStatus(_Model):
    phase: Phase = "Pending"
    """Lifecycle phase."""
    conditions: list[Condition] = Field(default_factory=list)
    """Latest observations, one per condition type."""
    observedGeneration: int = Field(default=0, ge=0)
    """metadata.generation the status reflects."""
    plan: PlanSummary | None = None
    """Summary of the current plan."""
    replicas: ReplicasStatus = Field(default_factory=ReplicasStatus)
    """Desired and ready replicas per role; replicas.attention.ready backs the /scale subresource."""
    selector: str = ""
    """Label selector of the attention pods (for the /scale subresource and HPA)."""
    kvCacheUtilization: float | None = Field(default=None, ge=0)
    """Mean KV-cache utilization over attention replicas (0-1)."""
    scalingHistory: list[ScalingEvent] = Field(default_factory=list, max_length=STATUS_SCALING_HISTORY)
    """Most recent scaling decisions, newest last."""
