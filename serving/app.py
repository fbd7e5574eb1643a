"""The Ray Serve application of a plan: ingress -> attention engines -> expert shards.

The same builder runs under KubeRay (`serveConfigV2` imports `v4d.serving.app:app_builder` with the
plan as the app's `args`) and locally (`v4d serve`). Placement comes from Ray node labels
`v4d.dev/pool=<pool>`: engines on the engine pool, each shard on its own pool.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from v4d.serving.engine.server import bind_engine
from v4d.serving.experts import bind_shards
from v4d.serving.ingress import Ingress
from v4d.serving.plan import Plan, local_weights_dir


def build_app(plan: Plan, api_key: str | None = None) -> Application:
    """Bind every deployment of `plan`; `api_key` overrides the key read from `plan.serving.api_key_env`."""
    if not plan.weights_uri:
        raise ValueError("weights_uri: empty; `v4d serve` makes a random checkpoint, the operator needs a real path")
    # every Ray pod mounts the weights at the same place, so the builder's view is each replica's
    wdir = local_weights_dir(plan.weights_uri)
    shards = bind_shards(plan, wdir)
    engine = bind_engine(plan, wdir, shards)
    return Ingress.bind(engine, plan, wdir, api_key)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve application builder: `args` is the plan dict (or {"plan": <plan dict>})."""
    plan = Plan.from_dict(args.get("plan", args))
    return build_app(plan, api_key=os.environ.get(plan.serving.api_key_env) or None)
