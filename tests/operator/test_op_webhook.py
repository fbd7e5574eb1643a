"""The optional validating admission webhook (kopf) registered with the real apiserver."""

from __future__ import annotations

import os
import subprocess

import pytest
from kopf.testing import KopfRunner
from kubecluster import wait_for
from kubernetes import client
from kubernetes.client.rest import ApiException
from opspecs import manifest, tiny_spec
from v4d.operator import handlers

G, V, P = "serving.v4d.dev", "v1alpha1", "v4deployments"
WEBHOOK = "v4deployments.serving.v4d.dev"


def test_webhook_rejects_semantically_invalid_specs(cluster, tmp_path):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    ns = cluster.namespace("hook")
    admission = client.AdmissionregistrationV1Api(cluster.api)
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(cluster.operator_kubeconfig)
    handlers.CONFIG = handlers.OperatorConfig(webhook_port=8410, webhook_addr="127.0.0.1",
                                              webhook_host="127.0.0.1", webhook_cert=str(cert),
                                              webhook_key=str(key))
    try:
        with KopfRunner(["run", "-n", ns, "--standalone", "-m", "v4d.operator.handlers"]) as runner:
            wait_for(lambda: admission.read_validating_webhook_configuration(WEBHOOK), timeout=30,
                     what="ValidatingWebhookConfiguration registered")
            custom = cluster.custom()
            bad = tiny_spec(autoscaling={"enabled": True, "minReplicas": 3, "maxReplicas": 2}, replicas=3)
            with pytest.raises(ApiException) as err:
                custom.create_namespaced_custom_object(G, V, ns, P, manifest("rejected", bad))
            assert "spec.autoscaling.minReplicas" in err.value.body and "admission webhook" in err.value.body
            custom.create_namespaced_custom_object(G, V, ns, P, manifest("accepted"))
            wait_for(lambda: custom.get_namespaced_custom_object("ray.io", "v1", ns, "rayservices", "accepted"),
                     what="RayService of the accepted spec")
        assert runner.exit_code == 0, runner.output[-3000:]
    finally:
        handlers.CONFIG = None
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old
        try:  # failurePolicy Fail: never leave it behind for the other tests
            admission.delete_validating_webhook_configuration(WEBHOOK)
        except ApiException as e:
            if e.status != 404:
                raise
