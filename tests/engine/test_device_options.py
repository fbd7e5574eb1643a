"""Devices of a pool (no Ray started): the claims each replica makes, what `v4d serve` declares, and
the torch device a replica picks."""

import pytest
import torch

from v4d.serving.experts import pool_actor_options
from v4d.serving.runtime.device import claims_at_max, node_resources, pair_backend, ray_options, torch_device

PLAN = {
    "pools": [{"name": "h200", "vendor": "nvidia", "ray_resource": "GPU", "devices": 10},
              {"name": "ascend", "vendor": "ascend", "ray_resource": "NPU", "devices": 3}],
    "engine": {"pool": "h200", "max_replicas": 3, "devices_per_replica": 4},
    "shards": [{"name": f"experts-ascend-{i}", "pool": "ascend"} for i in range(3)]
    + [{"name": "experts-h200-0", "pool": "h200"}],
}


def test_claims_per_vendor():
    assert ray_options(PLAN["pools"][0], 4) == {"num_gpus": 4}
    assert ray_options(PLAN["pools"][1], 1) == {"resources": {"NPU": 1}}
    assert ray_options(PLAN["pools"][0], 0) == {}
    engine = pool_actor_options(PLAN, "h200", devices=4)
    assert engine == {"num_cpus": 0.1, "label_selector": {"v4d.dev/pool": "h200"}, "num_gpus": 4}
    assert pool_actor_options(PLAN, "ascend", devices=1)["resources"] == {"NPU": 1}


def test_local_nodes_declare_what_replicas_can_claim():
    assert claims_at_max(PLAN, "h200") == 3 * 4 + 1
    assert node_resources(PLAN, "h200") == {"num_gpus": 13}   # more than the 10 planned: max scale
    assert node_resources(PLAN, "ascend") == {"resources": {"NPU": 3}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_torch_device_falls_back_to_the_cpu():
    assert torch_device("nvidia") == torch.device("cpu")
    assert torch_device("ascend") == torch.device("cpu")  # no torch_npu here


@pytest.mark.parametrize(("a", "b", "want"), [
    ("cuda", "cuda", "nccl"), (torch.device("cuda", 0), "cuda:1", "nccl"),
    ("npu", "npu", "hccl"),
    ("cuda", "npu", "gloo"), ("npu", "cuda", "gloo"),  # NCCL and HCCL do not talk to each other
    ("cuda", "cpu", "gloo"), ("cpu", "npu", "gloo"), ("cpu", "cpu", "gloo"),
])
def test_pair_backend_matches_both_ends_devices(a, b, want):
    assert pair_backend(a, b) == want
