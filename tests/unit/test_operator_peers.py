"""kopf peering as the resync loop reads it: a standby replica writes nothing (trust review:
kopf pauses its own watchers, not our resync loop, which went on writing statuses and
Events beside the active replica)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from kquant_operator import handlers
from kquant_operator.kube import ApiError
from kquant_operator.peers import blocking_peers, standing_by
from kquant_operator.settings import OperatorSettings

NOW = datetime(2026, 12, 8, 12, 0, 0, tzinfo=timezone.utc)


def record(priority: Any, seen: timedelta = timedelta(0), lifetime: Any = 60) -> dict:
    """A peer's record as kopf writes it, last seen ``seen`` before NOW."""
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - seen).isoformat()}


def test_a_live_peer_of_higher_priority_blocks():
    status = {"me": record(10), "other": record(20)}
    assert blocking_peers(status, 10, NOW) == ["other"]
    assert blocking_peers(status, 20, NOW) == []  # the other side is the active one


def test_a_dead_peer_blocks_nothing():
    status = {"me": record(10), "gone": record(20, seen=timedelta(seconds=61))}
    assert blocking_peers(status, 10, NOW) == []
    # within its lifetime it still counts
    status["gone"] = record(20, seen=timedelta(seconds=59))
    assert blocking_peers(status, 10, NOW) == ["gone"]


def test_two_records_of_one_priority_block_both_as_kopf_does():
    assert blocking_peers({"me": record(7)}, 7, NOW) == []  # only our own record
    assert blocking_peers({"me": record(7), "twin": record(7)}, 7, NOW) == ["me", "twin"]


def test_unreadable_records_are_left_out():
    status = {
        "me": record(10),
        "no-stamp": {"priority": 99, "lifetime": 60},
        "bad-stamp": {"priority": 99, "lifetime": 60, "lastseen": "yesterday"},
        "bad-prio": record("high"),
        "bad-life": record(99, lifetime="long"),
        "not-a-dict": "x",
    }
    assert blocking_peers(status, 10, NOW) == []


def test_a_naive_stamp_is_read_as_utc():
    naive = {"priority": 20, "lifetime": 60, "lastseen": NOW.replace(tzinfo=None).isoformat()}
    assert blocking_peers({"other": naive}, 10, NOW) == ["other"]


class PeeringKube:
    """Answers GETs of peering objects from ``objects`` (path -> body), or raises ``error``."""

    def __init__(self, objects: dict[str, dict], error: ApiError | None = None) -> None:
        self.objects, self.error, self.paths = objects, error, []
        self.listed: list[str] = []

    async def get(self, url_path: str) -> dict[str, Any]:
        self.paths.append(url_path)
        if self.error is not None:
            raise self.error
        return self.objects[url_path]

    async def list(self, url_path: str, label_selector: str = "") -> list[dict[str, Any]]:
        self.listed.append(url_path)  # the round went on to the QuantizationJobs
        return []


def live(priority: int) -> dict:
    stamp = datetime.now(timezone.utc).isoformat()
    return {"priority": priority, "lifetime": 60, "lastseen": stamp}


def test_namespaced_peerings_are_read_per_namespace_and_any_one_blocks():
    ns = "/apis/kopf.dev/v1/namespaces/{}/kopfpeerings/kquant"
    kube = PeeringKube({
        ns.format("a"): {"status": {"me": live(5)}},
        ns.format("b"): {"status": {"me": live(5), "active": live(9)}},
    })  # fmt: skip
    assert asyncio.run(standing_by(kube, "kquant", 5, ("a", "b"))) == ["active"]
    assert kube.paths == [ns.format("a"), ns.format("b")]


def test_the_cluster_peering_is_read_when_no_namespace_is_given():
    path = "/apis/kopf.dev/v1/clusterkopfpeerings/kquant"
    kube = PeeringKube({path: {}})  # no status yet: nobody else
    assert asyncio.run(standing_by(kube, "kquant", 5, ())) == []
    assert kube.paths == [path]


def memo_for(kube: Any, standalone: bool, clusterwide: bool = True) -> SimpleNamespace:
    peering = SimpleNamespace(standalone=standalone, clusterwide=clusterwide,
                              name="kquant", priority=5)  # fmt: skip
    settings = OperatorSettings.from_env({"KQUANT_WORKER_IMAGE": "kquant/worker:test"})
    return SimpleNamespace(peering=peering, kube=kube, settings=settings)


@pytest.mark.parametrize(
    ("priorities", "error", "expected"),
    [
        ({"active": 9}, None, True),
        ({"me": 5}, None, False),
        ({}, ApiError(403, "Forbidden", "no rights"), True),  # cannot tell: write nothing
    ],
)
def test_the_resync_loop_stands_by_as_the_peering_says(priorities, error, expected):
    path = "/apis/kopf.dev/v1/clusterkopfpeerings/kquant"
    objects = {peer: live(priority) for peer, priority in priorities.items()}  # stamped now
    kube = PeeringKube({path: {"status": objects}}, error)
    memo = memo_for(kube, standalone=False)
    assert asyncio.run(handlers._standing_by(memo, logging.getLogger("t"))) is expected


def test_a_standalone_operator_reads_no_peering():
    kube = PeeringKube({}, ApiError(500, "Boom", "must not be called"))
    assert asyncio.run(handlers._standing_by(memo_for(kube, True), logging.getLogger("t"))) is False
    assert kube.paths == []


def test_a_standby_round_lists_nothing(monkeypatch):
    """The loop itself: a blocked round makes no call beyond the peering's GET."""
    path = "/apis/kopf.dev/v1/clusterkopfpeerings/kquant"
    kube = PeeringKube({path: {"status": {"active": live(9)}}})
    memo = memo_for(kube, standalone=False)
    monkeypatch.setattr(handlers, "RESYNC_SECONDS", 0.01)

    async def two_rounds() -> None:
        task = asyncio.create_task(handlers._resync_loop(memo, logging.getLogger("t")))

        async def rounds() -> None:
            while len(kube.paths) < 2:
                await asyncio.sleep(0.01)

        try:
            await asyncio.wait_for(rounds(), 5)  # fails if no round reads the peering
        finally:
            task.cancel()

    asyncio.run(two_rounds())
    assert set(kube.paths) == {path} and kube.listed == []
    # ... and once the active replica's record expires, the next round goes on
    kube.objects[path]["status"]["active"]["lastseen"] = "2026-01-01T00:00:00+00:00"
    kube.paths.clear()
    asyncio.run(two_rounds())
    assert kube.listed
