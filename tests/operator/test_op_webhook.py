"""The optional validating admission webhook (kopf) registered with the real apiserver."""

from __future__ import annotations

import subprocess

import pytest
from helpers.kubecluster import stop_process, wait_for
from helpers.opspecs import manifest, tiny_spec
from kubernetes import client
from kubernetes.client.rest import ApiException

from v4d.serving.names import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.apiserver

G, V, P = GROUP, VERSION, PLURAL
WEBHOOK = "v4deployments.serving.v4d.dev"


def test_webhook_rejects_semantically_invalid_specs(cluster, tmp_path):
    """Invalid specs are refused at admission; an object that was invalid before the webhook existed
    can still be labelled and deleted, but not given another invalid spec."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    ns = cluster.namespace("hook")
    admission = client.AdmissionregistrationV1Api(cluster.api)
    custom = cluster.custom()
    bad = tiny_spec(autoscaling={"enabled": True, "minReplicas": 3, "maxReplicas": 2}, replicas=3)
    custom.create_namespaced_custom_object(G, V, ns, P, manifest("legacy", bad))  # before the webhook
    # A process, not KopfRunner: importing the webhook module registers its handler for good.
    proc = cluster.start_operator(
        tmp_path / "operator.log",
        "--namespace",
        ns,
        "--webhook-port",
        "8410",
        "--webhook-addr",
        "127.0.0.1",
        "--webhook-host",
        "127.0.0.1",
        "--webhook-cert",
        str(cert),
        "--webhook-key",
        str(key),
    )
    try:
        hook = wait_for(
            lambda: (h := admission.read_validating_webhook_configuration(WEBHOOK)).webhooks and h,
            timeout=60,
            what="ValidatingWebhookConfiguration registered",
        )  # kopf adds webhooks after creating it
        assert {tuple(sorted(r.operations)) for w in hook.webhooks for r in w.rules} == {("CREATE", "UPDATE")}
        attempts = iter(range(1000))

        def rejected() -> ApiException | None:
            """The apiserver enforces a just-registered webhook a moment later: retry until it does."""
            name = f"rejected-{next(attempts)}"
            try:
                custom.create_namespaced_custom_object(G, V, ns, P, manifest(name, bad))
            except ApiException as e:
                return e
            custom.delete_namespaced_custom_object(G, V, ns, P, name)  # deletion is never refused
            return None

        err = wait_for(rejected, timeout=30, interval=0.5, what="the webhook rejecting an invalid spec")
        assert "admission webhook" in err.body, err.body
        assert "spec.autoscaling.minReplicas" in err.body
        custom.patch_namespaced_custom_object(G, V, ns, P, "legacy", {"metadata": {"labels": {"team": "a"}}})
        worse = tiny_spec(autoscaling={"enabled": True, "minReplicas": 4, "maxReplicas": 2}, replicas=4)
        with pytest.raises(ApiException) as refused:
            custom.patch_namespaced_custom_object(G, V, ns, P, "legacy", {"spec": worse})
        assert refused.value.status == 422 and "spec.autoscaling.minReplicas" in refused.value.body
        custom.delete_namespaced_custom_object(G, V, ns, P, "legacy")
        custom.create_namespaced_custom_object(G, V, ns, P, manifest("accepted"))
        wait_for(
            lambda: custom.get_namespaced_custom_object("ray.io", "v1", ns, "rayservices", "accepted"),
            timeout=60,
            what="RayService of the accepted spec",
        )
    finally:
        stop_process(proc)
        try:  # failurePolicy Fail: never leave it behind for the other tests
            admission.delete_validating_webhook_configuration(WEBHOOK)
        except ApiException as e:
            if e.status != 404:
                raise
