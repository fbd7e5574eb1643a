"""Session fixture: a real control plane (etcd + kube-apiserver + kube-controller-manager 1.20, see
kubecluster.py) with the V4Deployment, KubeRay RayService and kopf peering CRDs installed.

Under CI (CI=true) a control plane that cannot start fails the tests; elsewhere they are skipped
with the reason (run scripts/setup-kube.sh once to build it).
"""

from __future__ import annotations

import os

import pytest
from kubecluster import ROOT, connect_and_install, start, stop, wait_for

__all__ = ["ROOT", "wait_for"]


@pytest.fixture(scope="session")
def cluster():
    try:
        start()
    except Exception as e:  # noqa: BLE001 - any failure to start is reported the same way
        stop()
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the local control plane could not start: {e}")
        pytest.skip(f"the local control plane could not start (run scripts/setup-kube.sh): {e}")
    try:
        yield connect_and_install()
    finally:
        stop()
