"""Plan dataclasses: the contract's shape and a lossless dict/JSON round trip (docs/contracts.md "Plan")."""

import copy
import json
import re

import pytest
from helpers.opspecs import load_example

from v4d.operator.planner import plan
from v4d.serving.plan import Plan


def test_plan_round_trips_through_json():
    p = plan(load_example("pro-h200-ascend.yaml")["spec"], name="pro")
    text = p.to_json()
    back = Plan.from_json(text)
    assert back == p
    assert back.to_dict() == json.loads(text)


def test_plan_dict_has_the_contract_keys():
    d = plan(load_example("local-tiny.yaml")["spec"], name="tiny").to_dict()
    assert set(d) >= {
        "name",
        "served_name",
        "model",
        "config",
        "weights_uri",
        "max_context_tokens",
        "pools",
        "engine",
        "shards",
        "experts",
        "balance",
        "kv",
        "serving",
        "warnings",
    }
    assert set(d["pools"][0]) >= {
        "name",
        "vendor",
        "resource_name",
        "ray_resource",
        "devices_per_node",
        "device_memory_gib",
        "nodes",
        "devices",
        "roles",
        "node_selector",
        "tolerations",
        "image",
    }
    assert set(d["engine"]) >= {
        "pool",
        "devices_per_replica",
        "replicas",
        "min_replicas",
        "max_replicas",
        "kv_budget_bytes",
        "capacity_tokens",
        "page_tokens",
        "max_num_seqs",
        "max_batch_tokens",
        "max_queue",
        "target_kv_utilization",
        "upscale_delay_s",
        "downscale_delay_s",
        "time_to_ready_s",
    }
    assert set(d["shards"][0]) >= {"name", "pool", "device", "slots", "weight_bytes"}
    assert set(d["experts"]) == {"logical", "physical", "redundant"}
    assert set(d["kv"]) == {"bytes_per_token", "capacity_tokens_per_replica"}
    assert set(d["serving"]) == {
        "port",
        "api_key_secret",
        "api_key_env",
        "max_queue",
        "request_timeout_s",
        "max_request_bytes",
    }


def test_expert_map_lists_every_copy():
    p = plan(load_example("local-tiny.yaml")["spec"], name="tiny")
    m = p.expert_map()
    assert len(m) == 6 and all(len(layer) == 16 for layer in m)
    for layer in m:
        assert sum(len(copies) for copies in layer) == p.experts.physical
        assert all(copies for copies in layer)


def test_autoscaling_spec_reaches_the_engine_plan():
    spec = load_example("flash-h200.yaml")["spec"]
    e = plan(spec, name="flash").engine
    a = spec["autoscaling"]
    assert (e.target_kv_utilization, e.upscale_delay_s, e.downscale_delay_s, e.time_to_ready_s) == (
        a["targetKVCacheUtilization"],
        a["upscaleStabilizationSeconds"],
        a["downscaleStabilizationSeconds"],
        600,
    )


def test_from_dict_names_a_missing_or_unknown_field():
    d = plan(load_example("local-tiny.yaml")["spec"], name="tiny").to_dict()
    for change, message in [
        (lambda x: x["engine"].pop("replicas"), "plan.engine.replicas: missing"),
        (lambda x: x["shards"][1].update(slot=[]), "plan.shards[1].slot: unknown field"),
        (lambda x: x.pop("serving"), "plan.serving: missing"),
        (lambda x: x.update(pools=[3]), "plan.pools[0]: expected an object, got int"),
    ]:
        bad = copy.deepcopy(d)
        change(bad)
        with pytest.raises(ValueError, match=re.escape(message)):
            Plan.from_dict(bad)
    del d["warnings"]  # optional: an older plan without warnings still loads
    assert Plan.from_dict(d).warnings == []


def test_max_request_bytes_reaches_the_plan():
    spec = load_example("local-tiny.yaml")["spec"]
    assert plan(spec, name="tiny").serving.max_request_bytes == 8 << 20  # the default: 8 MiB
    spec["serving"]["maxRequestBytes"] = 65536
    p = plan(spec, name="tiny")
    assert p.serving.max_request_bytes == 65536
    assert (
        Plan.from_dict({**p.to_dict(), "serving": {"port": 8000}}).serving.max_request_bytes == 8 << 20
    )  # older plans
