"""Rolling a prefix back to a set it still holds (``kquant-job rollback``).

A prefix keeps its last sets (``history`` of ``manifest.json``, each in
``.kquant/sets/<id>/``). Copying a set's own ``manifest.json`` over the prefix's, as the
README once said, switched readers of the manifest but left the fixed names holding the
newer set's files, and that set's own manifest carried the history of its day: the newer
set was in it no more, so its copies at the fixed names counted as someone else's and every
later run ended in ForeignObject (fault-injection trial). Here the rolled-back manifest is
the set's own, with the current history kept behind it, written conditionally on the
manifest read (a run committing meanwhile wins, and the rollback says so), and the fixed
names are brought in step at once (:func:`~kquant_job.sets.mirrors.sync_mirrors`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kquant_api import Reason
from kquant_job.errors import StorageError
from kquant_job.sets.layout import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    dumps,
    manifest_key,
    parse_manifest,
    set_dir,
)
from kquant_job.sets.mirrors import MirrorOutcome, sync_mirrors
from kquant_job.sets.state import read_state
from kquant_job.storage import Storage, join

__all__ = ["RollbackOutcome", "rollback"]


# A rolled-back manifest's sets committed after its own, newest first: a history alone
# cannot say (set ids hold their start time to the second, and a rollback puts the
# restored set first), and the next default rollback must go further back, not forward.
NEWER_KEY = "newerSets"


def commit_order(doc: dict, history: list[str]) -> list[str]:
    """The set ids of a manifest (``doc``, its ``history`` ids in order) newest first by
    commit: its history as written, or after a rollback the sets committed after the
    current one (``newerSets``), the current one, then the older ones."""
    newer = [s for s in doc.get(NEWER_KEY) or [] if isinstance(s, str) and s in history]
    return [*newer, *(s for s in history if s not in newer)]


@dataclass
class RollbackOutcome:
    """What a rollback did: the set current before (``previous``), the set now current
    (``current``; the same when there was nothing to do) and the fixed-name sync."""

    previous: str
    current: str
    mirrors: MirrorOutcome


def rollback(storage: Storage, prefix: str, to: str | None = None) -> RollbackOutcome:
    """Make set ``to`` (default: the one committed last before the current one; after a
    rollback whose fixed names were not all copied, none: that rollback is finished) the
    current set of ``prefix`` (ending in '/') again. Raises StorageError: SourceNotFound
    when the prefix has no kquant manifest, when ``to`` is not a set the prefix still holds,
    or when there is no earlier set; ConcurrentWrite when the manifest changed since it was read;
    ForeignObject / UnsafePath for a manifest kquant did not write; the storage's errors."""
    state = read_state(storage, prefix)
    manifest = state.manifest
    if manifest is None or manifest.set_id is None:
        raise StorageError(
            f"{prefix} holds no manifest of kquant's with sets: nothing to roll back",
            reason=Reason.SourceNotFound,
        )
    held = [h.set_id for h in manifest.history if h.set_id and h.set_id in state.sets]
    order = commit_order(manifest.data, [h.set_id for h in manifest.history])
    if to is None:
        if manifest.data.get(NEWER_KEY):
            # a rollback stopped before its names were in step: finish it, go no further
            # (run again, the same command had rolled back one set more each time)
            synced = sync_mirrors(storage, prefix)
            if synced.copied or synced.removed:
                return RollbackOutcome(manifest.set_id, manifest.set_id, synced)
        here = order.index(manifest.set_id)
        earlier = [s for s in order[here + 1 :] if s in held]
        if not earlier:
            raise StorageError(f"{prefix} holds no set before {manifest.set_id}",
                               reason=Reason.SourceNotFound)  # fmt: skip
        to = earlier[0]
    if to == manifest.set_id:
        return RollbackOutcome(to, to, sync_mirrors(storage, prefix))
    if to not in held:
        raise StorageError(
            f"{prefix}: set {to!r} is not one the prefix keeps (its sets: {', '.join(held)})",
            reason=Reason.SourceNotFound,
        )
    own_uri = join(prefix, set_dir(to) + MANIFEST)
    got = storage.read_bytes(own_uri, MAX_MANIFEST_BYTES)
    if got is None:
        raise StorageError(f"{own_uri} is gone: set {to} cannot be restored",
                           reason=Reason.SourceNotFound)  # fmt: skip
    own = parse_manifest(got[0], own_uri)
    if own.set_id != to:
        raise StorageError(f"{own_uri} names set {own.set_id}, not {to}",
                           reason=Reason.ForeignObject)  # fmt: skip
    missing = sorted(
        e["path"] for e in [*own.data["artifacts"], own.data.get("report") or {}]
        if isinstance(e, dict) and isinstance(e.get("path"), str)
        and e["path"].removeprefix(set_dir(to)) not in state.sets[to]
    )  # fmt: skip
    if missing:
        raise StorageError(f"set {to} under {prefix} lost {missing[:3]}: not restored",
                           reason=Reason.SourceNotFound)  # fmt: skip
    # the current history behind the restored set: every set that may have placed a fixed
    # name stays known as kquant's, so the names are replaced, not taken for a colleague's;
    # the older sets first (retention drops from the end), then those committed after it
    at = order.index(to)
    entries = {h.set_id: h for h in manifest.history}
    ids = [to, *order[at + 1 :], *order[:at]]
    doc = {**own.data, "history": [entries[i].to_json() for i in ids if i in entries],
           "rolledBackFrom": manifest.set_id, NEWER_KEY: order[:at]}  # fmt: skip
    assert state.etag is not None
    storage.write_bytes(join(prefix, manifest_key()), dumps(doc), if_match=state.etag)
    return RollbackOutcome(manifest.set_id, to, sync_mirrors(storage, prefix))
