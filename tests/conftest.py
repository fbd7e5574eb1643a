"""Session-wide: a real control plane (etcd + kube-apiserver + kube-controller-manager 1.20, see
helpers/kubecluster.py) with the V4Deployment, KubeRay RayService and kopf peering CRDs installed, for the
operator and observability tests; and how the pytest process leaves.

Under CI (CI=true) a control plane that cannot start fails the tests; elsewhere they are skipped
with the reason (run scripts/setup-kube.sh once to build it). The control-plane helpers are imported
inside the fixture: tests that need no cluster run where the `kubernetes` package is not installed
(a bare GPU machine).
"""

from __future__ import annotations

import os
import sys

import pytest


@pytest.fixture(scope="session")
def cluster():
    from helpers.kubecluster import connect_and_install, start, stop

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


# Fixtures that start servers on fixed ports -> the marker a test using them must carry (pyproject).
SERVER_FIXTURES = {
    "cluster": "apiserver",
    "ray_cluster": "ray",
    "serve_instance": "ray",
    "ray_scrape": "ray",
    "prometheus": "prometheus",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts a server is marked for it, so `-m` selects exactly the unit tests."""
    unmarked = [
        f"{item.nodeid} uses `{fixture}` but is not marked `{mark}`"
        for item in items
        for fixture, mark in SERVER_FIXTURES.items()
        if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(mark) is None
    ]
    if unmarked:
        raise pytest.UsageError("\n".join(unmarked))


_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Once pytest has reported, leave with its exit status and without the interpreter's teardown.

    This process is a Ray driver for the engine and metrics tests, and Ray's native (gRPC) threads
    outlive ray.shutdown(); tearing the interpreter down under them killed one CI run with SIGSEGV
    after every test had passed. Nothing is left to decide at this point: the summary is printed.
    A usage error (e.g. an unmarked server test) is reported by pytest after this hook, so it exits
    normally."""
    if config.stash.get(_EXIT_STATUS, pytest.ExitCode.USAGE_ERROR) != pytest.ExitCode.USAGE_ERROR:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])
