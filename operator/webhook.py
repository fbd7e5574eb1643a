"""The optional validating admission webhook: the reconciler's checks, run at admission time.

Imported only when the webhook is on (`v4d operator --webhook-port P`, or
`kopf run -m v4d.operator.handlers -m v4d.operator.webhook` with V4D_WEBHOOK_PORT set): kopf refuses
to start with admission handlers but no webhook server.
"""

from __future__ import annotations

from typing import Any

import kopf

from v4d.operator.validate import validate_spec
from v4d.serving.names import GROUP, PLURAL, VERSION


@kopf.on.validate(GROUP, VERSION, PLURAL, operations={"CREATE", "UPDATE"})
def admission(spec: dict[str, Any], old: dict[str, Any] | None, operation: str, **_: Any) -> None:
    """Rejects a spec that would be `Invalid`. Deletion is never refused, nor an update that leaves the
    spec as it was (labels, annotations, finalizers), so an object that was invalid before the webhook
    existed can still be labelled and deleted."""
    if operation == "UPDATE" and old is not None and old.get("spec") == dict(spec):
        return
    issues = validate_spec(dict(spec))
    if issues:
        raise kopf.AdmissionError("; ".join(str(i) for i in issues), code=422)
