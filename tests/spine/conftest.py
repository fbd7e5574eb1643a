"""Shared fixtures for the spine tests: the example manifests and a valid base spec to mutate."""

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def load_example(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


@pytest.fixture
def tiny_manifest() -> dict:
    return copy.deepcopy(load_example("local-tiny.yaml"))


@pytest.fixture
def tiny_spec(tiny_manifest) -> dict:
    return tiny_manifest["spec"]
