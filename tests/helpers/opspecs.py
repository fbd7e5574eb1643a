"""V4Deployment specs and manifests for the tests and bench/operator.py: the shipped examples and
samples, and a v4-tiny spec that plans in milliseconds."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from v4d.serving.names import API_VERSION, KIND

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "manifests" / "samples"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

TINY: dict[str, Any] = {
    "model": {"preset": "v4-tiny", "weights": {"uri": "pvc://tiny-weights/ckpt"}, "maxContextTokens": 4096},
    "pools": [
        {
            "name": "gpu",
            "vendor": "nvidia",
            "devicesPerNode": 4,
            "deviceMemoryGiB": 0.008,
            "maxNodes": 2,
            "roles": ["attention", "experts"],
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        {
            "name": "npu",
            "vendor": "ascend",
            "resourceName": "huawei.com/Ascend910",
            "devicesPerNode": 2,
            "deviceMemoryGiB": 0.001,
            "maxNodes": 1,
            "roles": ["experts"],
            "nodeSelector": {"accelerator": "huawei-Ascend910"},
        },
    ],
    "parallelism": {"redundantExperts": 2},
    "replicas": 1,
    "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 2},
    "serving": {"port": 8000, "maxNumSeqs": 8, "maxBatchTokens": 2048, "maxQueue": 64},
}


def tiny_spec(**changes: Any) -> dict[str, Any]:
    """A copy of TINY with top-level keys replaced."""
    spec = copy.deepcopy(TINY)
    spec.update(copy.deepcopy(changes))
    return spec


def manifest(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": spec if spec is not None else tiny_spec(),
    }


def sample(name: str) -> dict[str, Any]:
    """A manifest of manifests/samples/."""
    return yaml.safe_load((SAMPLES / name).read_text())


def load_example(name: str) -> dict[str, Any]:
    """A manifest of examples/."""
    return yaml.safe_load((ROOT / "examples" / name).read_text())
