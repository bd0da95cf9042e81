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
