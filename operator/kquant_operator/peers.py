"""Whether this replica stands by under kopf peering, decided as kopf decides it.

With ``replicas > 1`` the chart runs every replica with ``--peering`` and its own random
priority; kopf pauses the watchers of each replica that sees a live peer of higher priority
(or another of the same priority) in the peering object's status. kopf does not pause our
resync loop, which is not a kopf handler, and exposes no pause flag to it: a standby replica
went on writing statuses and posting Events beside the active one (trust review). The loop
reads the same peering object each round and skips the round while kopf would stand by.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from kquant_operator.kube import Kube

PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"


def _peering_path(namespace: str | None, name: str) -> str:
    """The peering object's REST path: KopfPeering per namespace, or the ClusterKopfPeering
    (``namespace`` None) when the operator serves the whole cluster."""
    root = f"/apis/{PEERING_GROUP}/{PEERING_VERSION}"
    if namespace is None:
        return f"{root}/clusterkopfpeerings/{name}"
    return f"{root}/namespaces/{namespace}/kopfpeerings/{name}"


def _deadline(record: Mapping[str, Any]) -> datetime | None:
    """``lastseen`` + ``lifetime`` (seconds) of one peer's record; None when unreadable."""
    try:
        seen = datetime.fromisoformat(str(record["lastseen"]))
        lifetime = timedelta(seconds=int(record.get("lifetime", 60)))
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    if seen.tzinfo is None:  # kopf writes UTC; a naive stamp is read as UTC too
        seen = seen.replace(tzinfo=timezone.utc)
    return seen + lifetime


def blocking_peers(status: Mapping[str, Any], priority: int, now: datetime) -> list[str]:
    """Identities of the live peers before which an operator of ``priority`` pauses.

    ``status`` is the peering object's status: ``{identity: {"priority": int, "lastseen":
    ISO 8601, "lifetime": seconds}}``, this replica's own record included. A record is live
    until ``lastseen + lifetime`` (``now`` must be timezone-aware). As kopf's
    ``process_peering_event``: a live peer of higher priority pauses; live peers of the same
    priority pause all of them. Our own identity is not known here (kopf keeps it), so the
    same priority blocks when two or more live records hold it, ours being one; priorities
    are drawn from 2^24 values per replica. An unreadable record is left out, as kopf
    cannot read it either.
    """
    higher, same = [], []
    for identity, record in status.items():
        if not isinstance(record, Mapping):
            continue
        deadline = _deadline(record)
        if deadline is None or deadline < now:
            continue
        try:
            theirs = int(record.get("priority", 0))
        except (TypeError, ValueError):
            continue
        if theirs > priority:
            higher.append(str(identity))
        elif theirs == priority:
            same.append(str(identity))
    return sorted(higher + (same if len(same) >= 2 else []))


async def standing_by(
    kube: Kube, name: str, priority: int, namespaces: tuple[str, ...]
) -> list[str]:
    """The live peers before which this replica pauses, over the peering objects of the
    served ``namespaces`` (the ClusterKopfPeering ``name`` when empty); kopf pauses the
    whole operator when any one of them says so.

    Raises :class:`~kquant_operator.kube.ApiError` when a peering object cannot be read: the
    caller then cannot tell whether it is the active replica, and writes nothing.
    """
    now = datetime.now(timezone.utc)
    blocking: list[str] = []
    for namespace in namespaces or (None,):
        peering = await kube.get(_peering_path(namespace, name))
        blocking += blocking_peers(peering.get("status") or {}, priority, now)
    return sorted(set(blocking))
