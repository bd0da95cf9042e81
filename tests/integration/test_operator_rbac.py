"""The chart's RBAC against the API requests the operator really sends: kopf and the real
handlers run against the kmock emulator (a create, its Job's events, a spec change that
replaces the Job), every request from the operator is recorded, and each must be allowed by
the ClusterRole that charts/kquant renders, and every rule but one is used.
(tests/unit/test_chart.py checks the rules against a scan of the code, for both scopes.)"""

from __future__ import annotations

from typing import Any

import attrs
import kmock
import pytest
from chart_helpers import granted, render
from kube_emulator import QJOBS, KubeEmulator
from operator_helpers import final_status, wait_for
from test_operator_loop import NS, canned, example_in, loop_for

pytestmark = [pytest.mark.asyncio]
VERBS = {
    kmock.action.LIST: "list",
    kmock.action.WATCH: "watch",
    kmock.action.FETCH: "get",
    kmock.action.CREATE: "create",
    kmock.action.DELETE: "delete",
}


@attrs.define(kw_only=True)
class RecordingEmulator(KubeEmulator):
    """The emulator, noting (apiGroup, resource[/sub], verb) of every request that does not
    come from the test's own clients (``kmock/...``; kopf says ``kopf/...``, the handlers' client
    ``kquant-operator``), and the user agents seen."""

    calls: set[tuple[str, str, str]] = attrs.field(factory=set, init=False)
    agents: set[str] = attrs.field(factory=set, init=False)

    async def _handle(self, request: kmock.Request) -> Any:
        agent = request.headers.get("User-Agent", "")
        res = request.resource
        if not agent.startswith(("Python/", "kmock/")) and res is not None and res.plural:
            verb = VERBS.get(request.action)
            if request.action == kmock.action.UPDATE:
                verb = "patch" if request.method == "PATCH" else "update"
            plural = res.plural + (f"/{request.subresource}" if request.subresource else "")
            self.calls.add((res.group or "", plural, verb or str(request.action)))
            self.agents.add(agent.split("/")[0])
        return await super()._handle(request)


def cluster_role_grants() -> set[tuple[str, str, str]]:
    (role,) = [d for d in render() if d.get("kind") == "ClusterRole"]
    return granted(role)


@pytest.mark.kmock(cls=RecordingEmulator)
async def test_every_request_of_the_operator_is_granted(kmock, tmp_path):
    async with loop_for(kmock, tmp_path, canned) as loop:
        await loop.apply(example_in("bucket", "http://127.0.0.1:1", name="qj-rbac"))
        await loop.final("qj-rbac")
        change = {"spec": {"output": {"uri": "s3://bucket/models/silero-vad/v7-fp16/"}}}
        await loop.api.patch(QJOBS, NS, "qj-rbac", change)
        await wait_for(
            lambda: (s := final_status(kmock, NS, "qj-rbac")) and s["observedGeneration"] == 2,
            what="generation 2's status",
        )
    calls = kmock.calls
    assert "kquant-operator" in kmock.agents  # the handlers' client names itself
    # The run exercised what the handlers do: otherwise the subset check below proves little.
    for call in [
        ("kquant.io", "quantizationjobs", "watch"),
        ("kquant.io", "quantizationjobs/status", "patch"),
        ("batch", "jobs", "create"),
        ("batch", "jobs", "delete"),
        ("", "pods", "list"),
        ("", "events", "create"),
    ]:
        assert call in calls, f"{call} not seen; recorded: {sorted(calls)}"
    granted = cluster_role_grants()
    assert calls <= granted, sorted(calls - granted)
    # And nothing granted goes unused, but for the Job read of an adoption (after a 409 on
    # create: an operator restart, covered by test_operator_loop) or of a status write's
    # retry, which this run may not need, and the finalizers update that admission checks
    # for the Job's blockOwnerDeletion (no request of ours: OwnerReferencesPermission-
    # Enforcement, on in OpenShift).
    assert granted - calls <= {
        ("batch", "jobs", "get"),
        ("kquant.io", "quantizationjobs/finalizers", "update"),
    }
    assert ("kquant.io", "quantizationjobs/finalizers", "update") not in calls
