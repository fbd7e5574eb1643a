"""Helpers shared by the tests (and bench/operator.py), imported as `helpers.<module>`.

`kubecluster` (the local control plane; imports `kubernetes`, so only tests that need the apiserver
import it), `models` (random-weight models by preset), `opspecs` (V4Deployment specs and manifests),
`servingapp` (the names of the serving
tests' application).
"""
