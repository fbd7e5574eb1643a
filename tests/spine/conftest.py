"""Fixtures for the spine tests: a valid base manifest and spec to mutate (helpers.opspecs)."""

import copy

import pytest
from helpers.opspecs import load_example


@pytest.fixture
def tiny_manifest() -> dict:
    return copy.deepcopy(load_example("local-tiny.yaml"))


@pytest.fixture
def tiny_spec(tiny_manifest) -> dict:
    return tiny_manifest["spec"]
