"""One Ray cluster and one served application for the whole serving test session.

The cluster is the one `v4d serve` starts (`v4d.serving.local`): head + one labelled node per pool.
The app is the real one: ingress -> attention engine (real model, small KV budget) -> expert
shards on two pools (NVIDIA and Ascend stand-ins). A second, torch-free app ("scripted", with an
API key) puts the real ingress in front of a replaying engine for tool-call output and auth tests.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import pytest
from helpers.servingapp import API_KEY, APP, HTTP_PORT

from v4d.serving.local import RAY_ENV

os.environ.update(RAY_ENV)

# A tiny model over two pools. The KV budget is replaced below by a deliberately small one, so a
# handful of requests fill it (queueing, 429s, autoscaling), while 4 concurrent short ones fit.
SPEC = {
    "model": {"preset": "v4-tiny", "servedName": "v4-tiny", "maxContextTokens": 1024},
    "pools": [
        {
            "name": "gpu",
            "vendor": "nvidia",
            "devicesPerNode": 4,
            "deviceMemoryGiB": 0.008,
            "maxNodes": 1,
            "roles": ["attention", "experts"],
        },
        {
            "name": "npu",
            "vendor": "ascend",
            "devicesPerNode": 2,
            "deviceMemoryGiB": 0.008,
            "maxNodes": 1,
            "roles": ["experts"],
        },
    ],
    "parallelism": {"redundantExperts": 16, "expertParallelSize": 2},
    "replicas": 1,
    "autoscaling": {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 2,
        "targetKVCacheUtilization": 0.5,
        "upscaleStabilizationSeconds": 0,
        "downscaleStabilizationSeconds": 4,
    },
    "serving": {"port": HTTP_PORT, "maxNumSeqs": 4, "maxBatchTokens": 256, "maxQueue": 4, "requestTimeoutSeconds": 60},
}
SMALL_KV_PAGES = 8  # 128-token pages per engine replica


def pytest_collection_modifyitems(items):
    """`v4d serve` (its own cluster) runs before the session cluster exists; shutdown runs last."""
    first = [i for i in items if i.module.__name__.endswith("test_cli")]
    last = [i for i in items if i.name == "test_graceful_shutdown_finishes_inflight_streams"]
    middle = [i for i in items if i not in first and i not in last]
    items[:] = first + middle + last


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("v4d-cache")
    os.environ["V4D_CACHE"] = str(d)
    return d


@pytest.fixture(scope="session")
def plan(cache_dir):
    from v4d.operator.planner import plan as make_plan
    from v4d.serving.config import get_preset
    from v4d.serving.local import ensure_checkpoint
    from v4d.serving.sizing import page_bytes, slot_bytes

    p = ensure_checkpoint(make_plan(copy.deepcopy(SPEC), name="tiny"), log=lambda s: None)
    cfg = get_preset("v4-tiny")
    e = p.engine
    snaps = max(1, e.max_num_seqs // 4)
    budget = (e.max_num_seqs + snaps) * slot_bytes(cfg, "fp32") + SMALL_KV_PAGES * page_bytes(cfg, "fp32")
    return replace(
        p,
        engine=replace(
            e,
            kv_budget_bytes=budget,
            num_pages=SMALL_KV_PAGES,
            kv_format="fp32",
            capacity_tokens=SMALL_KV_PAGES * e.page_tokens,
        ),
    )


@pytest.fixture(scope="session")
def ray_cluster(plan):
    from v4d.serving.local import start_cluster

    local = start_cluster(plan, HTTP_PORT + 1)
    yield local
    local.shutdown()


@pytest.fixture(scope="session")
def base_url(ray_cluster, plan):
    from v4d.serving.local import deploy

    # as a manifest names local weights: the app resolves the URI to the directory (serving/plan.py weights_dir)
    deploy(replace(plan, weights_uri=f"file://{plan.weights_uri}"), HTTP_PORT, app_name=APP)
    return f"http://127.0.0.1:{HTTP_PORT}"


@pytest.fixture(scope="session")
def scripted_url(base_url, plan):
    import ray
    import scripted
    from ray import serve

    from v4d.serving.ingress import Ingress

    ray.cloudpickle.register_pickle_by_value(scripted)  # replicas cannot import the tests folder
    ScriptedEngine = scripted.ScriptedEngine

    app = Ingress.options(name="scripted-ingress").bind(
        ScriptedEngine.bind(plan.weights_uri), plan, plan.weights_uri, API_KEY
    )
    serve.run(app, name="scripted", route_prefix="/scripted")
    return f"{base_url}/scripted"


@pytest.fixture(scope="session")
def engine(base_url):
    from ray import serve

    return serve.get_deployment_handle("engine", app_name=APP)


@pytest.fixture
def oai(base_url):
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture
def anth(base_url):
    import anthropic

    return anthropic.Anthropic(base_url=base_url, api_key="none", max_retries=0, timeout=120)
