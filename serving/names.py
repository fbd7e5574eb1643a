"""Names and constants that serving and the operator must agree on (pure: no imports beyond typing).

One home for each: the V4Deployment API's group/version/kind, the labels on Ray nodes and pods, the
names of a deployment's child objects, and how many scaling decisions are kept where. The operator
layer imports these (it sits above serving); serving code reads them too, so a renamed label or
object changes in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

# -- the V4Deployment API --------------------------------------------------------------------
GROUP = "serving.v4d.dev"
VERSION = "v1alpha1"
KIND = "V4Deployment"
PLURAL = "v4deployments"
API_VERSION = f"{GROUP}/{VERSION}"

# -- labels ------------------------------------------------------------------------------------
POOL_LABEL = "v4d.dev/pool"  # Ray node label (and pod label): the pool a node belongs to
ROLE_LABEL = "v4d.dev/role"  # Ray node label (and pod label): head, attention or experts
DEPLOYMENT_LABEL = "v4d.dev/deployment"  # pod/child label: the owning V4Deployment
API_POD_LABEL = "v4d.dev/api"  # on the head pods, whose Serve proxy the API Service selects
MANAGED_BY = "v4d-operator"  # app.kubernetes.io/managed-by of every child

# -- the Serve application ---------------------------------------------------------------------
APP_IMPORT_PATH = "v4d.serving.app:app_builder"
SERVE_PORT = 8000  # Ray Serve's HTTP proxy port in every Ray pod
METRICS_PORT = 8080  # Ray's metrics export port
DEPLOYMENT_ENV = "V4D_DEPLOYMENT"  # env var naming the V4Deployment in every Ray pod
WEIGHTS_DIR_ENV = "V4D_WEIGHTS_DIR"  # where a pod has the pvc:// or hostpath:// weights mounted

# -- scaling history ---------------------------------------------------------------------------
STATUS_SCALING_HISTORY = 10  # decisions in status.scalingHistory and in the decisions ConfigMap
RAY_KV_SCALING_HISTORY = 50  # decisions per app kept in Ray's internal KV (GET /v4d/autoscaling)


@dataclass(frozen=True)
class ChildNames:
    """Names of the objects the operator creates for V4Deployment `name` (all in its namespace)."""

    deployment: str

    @property
    def rayservice(self) -> str:
        return self.deployment

    @property
    def plan(self) -> str:
        return f"{self.deployment}-plan"

    @property
    def api(self) -> str:
        return f"{self.deployment}-api"

    @property
    def autoscaling(self) -> str:
        """ConfigMap the autoscaling policy's decisions are published to (decisions.DecisionsConfigMap)."""
        return f"{self.deployment}-autoscaling"

    @property
    def ray_account(self) -> str:
        """ServiceAccount (and Role, RoleBinding) of the Ray pods: may get/patch the autoscaling ConfigMap."""
        return f"{self.deployment}-ray"

    @property
    def podmonitor(self) -> str:
        return self.deployment


ENGINE_DEPLOYMENT = "engine"  # Serve deployment name of the attention engines (any name containing it)
SHARD_PREFIX = "experts-"  # Serve deployment names of expert shards: experts-<pool>-<i>


def shard_name(pool: str, index: int) -> str:
    """Serve deployment name of expert shard `index` on `pool` (the operator's status matches on it)."""
    return f"{SHARD_PREFIX}{pool}-{index}"
