"""The operator's resync round: one CR's trouble skips no other (fault-injection trial: a
garbled answer for one CR's Job aborted the whole round, every round, for every CR after it)."""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

from operator_objects import job, qjob

from kquant_operator import handlers
from kquant_operator.settings import OperatorSettings


class FakeKube:
    """Answers the resync's calls from two CRs; the first CR's Job answer is garbled."""

    def __init__(self) -> None:
        good = qjob()
        good["metadata"].update(name="good", uid="uid-good")
        bad = qjob()
        bad["metadata"].update(name="bad", uid="uid-bad")
        self.crs = {"bad": bad, "good": good}
        self.patched: list[str] = []

    async def list(self, url_path: str, label_selector: str = "") -> list[dict[str, Any]]:
        return [copy.deepcopy(cr) for cr in self.crs.values()]

    async def get(self, url_path: str) -> dict[str, Any]:
        name = url_path.rsplit("/", 1)[1]
        if "/jobs/" in url_path:
            owner = name.rsplit("-", 1)[0]
            if owner == "bad":
                raise ValueError("Expecting value: line 1 column 1 (char 0)")  # not JSON
            return job(self.crs[owner], uid="job-good")
        return copy.deepcopy(self.crs[name])

    async def merge_patch(self, url_path: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patched.append(url_path.split("/")[-2])
        return {}


def test_one_crs_failure_skips_no_other_in_the_round() -> None:
    kube = FakeKube()
    settings = OperatorSettings.from_env({"KQUANT_WORKER_IMAGE": "kquant/worker:test"})
    asyncio.run(handlers.resync(kube, settings, logging.getLogger("test")))
    assert kube.patched == ["good"]


class RacedKube(FakeKube):
    """One CR whose Job the resync reads running; by the time it reads the CR, that Job
    was deleted and its DELETED event wrote the JobDeleted verdict (operator trial)."""

    def __init__(self) -> None:
        super().__init__()
        from kquant_operator.status import derive_status

        cr = self.crs["good"]
        self.job = job(cr, uid="job-good")
        self.job["status"] = {"active": 1, "ready": 1, "startTime": "2026-12-07T00:00:00Z"}
        cr["status"] = derive_status(cr, self.job, [])
        self.crs = {"good": cr}

    async def get(self, url_path: str) -> dict[str, Any]:
        from kquant_operator.status import lost_status

        if "/jobs/" in url_path:
            answer = copy.deepcopy(self.job)
            final = copy.deepcopy(self.crs["good"])  # ... meanwhile: deleted, verdict written
            final["status"] = lost_status(final, self.job["metadata"]["name"])
            self.crs["good"] = final
            return answer
        return await super().get(url_path)


def test_a_resync_never_writes_a_stale_job_over_a_verdict() -> None:
    """Before, the resync wrote Running from its earlier read of the Job over JobDeleted, and
    with the Job gone nothing wrote the verdict again."""
    kube = RacedKube()
    assert kube.crs["good"]["status"]["phase"] == "Running"
    settings = OperatorSettings.from_env({"KQUANT_WORKER_IMAGE": "kquant/worker:test"})
    asyncio.run(handlers.resync(kube, settings, logging.getLogger("test")))
    assert kube.patched == []
    assert kube.crs["good"]["status"]["reason"] == "JobDeleted"
