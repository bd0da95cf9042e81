"""Two replicas under kopf peering: the standby writes nothing (trust review). kopf pauses
its own watchers when a live peer of higher priority is in the peering object; the resync
loop, which is ours, went on writing statuses and posting Events beside the active replica."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

import kmock
import pytest
from job_standin import JobStandIn
from kube_emulator import EVENTS, JOBS, QJOBS, KubeEmulator
from operator_helpers import Api, final_status, operator_running, stored, wait_for
from test_operator_loop import NS, canned, example_in, status_of

from kquant_api import JobResult

pytestmark = [pytest.mark.asyncio, pytest.mark.kmock(cls=KubeEmulator)]
PEERINGS = kmock.resource("kopf.dev/v1/kopfpeerings")


def complete(kmock: KubeEmulator) -> bool:
    jobs = stored(kmock, JOBS, NS)
    conditions = (jobs[0].get("status") or {}).get("conditions") or [] if jobs else []
    return any(c["type"] == "Complete" for c in conditions)


async def test_a_standby_replica_writes_no_status_until_the_active_one_is_gone(
    kmock, tmp_path, monkeypatch, caplog
):
    import kquant_operator.handlers as handlers

    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 0.5)
    caplog.set_level(logging.INFO, logger="kopf")
    monkeypatch.setenv("KQUANT_WATCH_NAMESPACES", NS)
    kmock.resources[PEERINGS] = kmock.ResourceInfo(
        kind="KopfPeering", singular="kopfpeering", namespaced=True,
        verbs={"create", "get", "list", "patch", "watch"},
    )  # fmt: skip
    api = Api(kmock)
    await api.create(PEERINGS, NS, {"metadata": {"name": "kquant"}})
    release = asyncio.Event()

    async def held(job: dict) -> JobResult:
        await release.wait()
        return canned(job)

    replica = operator_running(kmock, tmp_path, (NS,), ("--peering=kquant", "--priority=5"))
    async with JobStandIn(kmock, tmp_path / "kubelet", held), replica:
        await api.create(QJOBS, NS, example_in("bucket", "http://127.0.0.1:1", name="qj-1"))
        await wait_for(lambda: status_of(kmock, "qj-1").get("phase") == "Running", what="run")
        # another replica of higher priority becomes active: kopf pauses this one
        active = {"priority": 100, "lifetime": 60, "lastseen": datetime.now(timezone.utc)}
        active["lastseen"] = active["lastseen"].isoformat()
        await api.patch(PEERINGS, NS, "kquant", {"status": {"active-replica": active}})
        await wait_for(  # kopf has seen it and paused its watchers (else kopf would write)
            lambda: any("Pausing operations" in r.getMessage() for r in caplog.records),
            what="kopf's pause",
        )
        release.set()
        await wait_for(lambda: complete(kmock), what="the Job's completion")
        await asyncio.sleep(3)  # six resync rounds
        assert status_of(kmock, "qj-1").get("phase") == "Running"  # the active one's to write
        reasons = {e["reason"] for e in stored(kmock, EVENTS, NS)}
        assert "Succeeded" not in reasons
        # the active replica stops renewing its record; once expired, this one takes over
        active["lastseen"] = "2026-01-01T00:00:00+00:00"
        await api.patch(PEERINGS, NS, "kquant", {"status": {"active-replica": active}})
        status = await wait_for(lambda: final_status(kmock, NS, "qj-1"), what="a verdict")
    assert (status["phase"], status["reason"]) == ("Succeeded", "Validated")
