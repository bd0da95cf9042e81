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

Which set a rollback without ``--to`` restores follows the manifest's ``lineage``
(:func:`~kquant_job.sets.layout.lineage`): the set that was current before the current one,
so rollbacks in a row go further back, never forward to a set rolled back from. The
rolled-back manifest is written with ``rollbackPending`` until its fixed names are in step:
the same command run again after a kill finishes that rollback instead of going one set
further (trial).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kquant_api import Reason
from kquant_job.errors import StorageError
from kquant_job.sets.layout import (
    LINEAGE_KEY,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    NEWER_KEY,
    Retention,
    dumps,
    lineage,
    manifest_key,
    parse_manifest,
    set_dir,
)
from kquant_job.sets.mirrors import MirrorOutcome, sync_mirrors
from kquant_job.sets.state import PrefixState, abort_orphan_uploads, read_state
from kquant_job.storage import Storage, join

__all__ = ["PENDING_KEY", "RollbackOutcome", "rollback"]

LOG = logging.getLogger("kquant.publish")
PENDING_KEY = "rollbackPending"  # set while the rolled-back manifest's fixed names are synced


@dataclass
class RollbackOutcome:
    """What a rollback did: the set current before (``previous``), the set now current
    (``current``; the same when there was nothing to do) and the fixed-name sync."""

    previous: str
    current: str
    mirrors: MirrorOutcome


def rollback(
    storage: Storage, prefix: str, to: str | None = None, home: str = ""
) -> RollbackOutcome:
    """Make set ``to`` (default: the set current before the current one, by the manifest's
    lineage; after a rollback interrupted before its fixed names were in step, none: that
    rollback is finished) the current set of ``prefix`` (ending in '/'; ``home``: the folder
    of an output beside the originals, ``.kquant/beside-fp16/``) again. Raises StorageError:
    SourceNotFound when the prefix has no kquant manifest, when ``to`` is not a set the
    prefix still holds, or when there is no earlier set; ConcurrentWrite when the manifest
    changed since it was read, or a job committed while the names were synced;
    ForeignObject / UnsafePath for a manifest kquant did not write or a garbled one; the
    storage's errors."""
    state = read_state(storage, prefix, home)
    manifest = state.manifest
    where = join(prefix, manifest_key(home))
    if manifest is None or manifest.set_id is None:
        raise StorageError(
            f"{where}: no manifest of kquant's with sets: nothing to roll back (an output "
            "beside the originals keeps its own under .kquant/beside-<name>/: name that)",
            reason=Reason.SourceNotFound,
        )
    line = lineage(manifest)
    if not line:
        raise StorageError(
            f"{where} names set {manifest.set_id}, which its history and lineage do not hold "
            "as current: not a manifest kquant wrote; nothing rolled back",
            reason=Reason.ForeignObject,
        )
    held = [s for s in dict.fromkeys(h.set_id for h in manifest.history) if s in state.sets]
    if to is None and manifest.data.get(PENDING_KEY):
        # a rollback stopped before its names were in step: finish it, go no further (run
        # again, the same command had rolled back one set more each time)
        previous = str(manifest.data.get("rolledBackFrom") or manifest.set_id)
        return _finish(state, manifest.set_id, previous, manifest.data, state.etag)
    if to is None:
        earlier = [s for s in line[1:] if s in held]
        if not earlier:
            raise StorageError(f"{prefix} holds no set before {manifest.set_id}",
                               reason=Reason.SourceNotFound)  # fmt: skip
        to = earlier[0]
    if to == manifest.set_id:
        return _finish(state, to, to, manifest.data, state.etag)
    if to not in held:
        raise StorageError(
            f"{prefix}: set {to!r} is not one the prefix keeps (its sets: {', '.join(held)})",
            reason=Reason.SourceNotFound,
        )
    doc = _restored(state, to)
    # back down the lineage to ``to`` (the sets above it taken off), or ``to`` put on top
    # (--to a set rolled back from earlier)
    new_line = line[line.index(to) :] if to in line else [to, *line]
    # the whole current history kept behind the restored set: every set that may have placed
    # a fixed name stays known as kquant's, so the names are replaced, not taken for a
    # colleague's; the lineage first (retention drops from the end)
    entries = {}
    for entry in manifest.history:
        entries.setdefault(entry.set_id, entry)
    ids = [*new_line, *(s for s in entries if s not in new_line)]
    doc = {**doc, "history": [entries[i].to_json() for i in ids if i in entries],
           LINEAGE_KEY: new_line, "rolledBackFrom": manifest.set_id, PENDING_KEY: True}  # fmt: skip
    doc.pop(NEWER_KEY, None)
    try:
        etag = storage.write_bytes(where, dumps(doc), if_match=state.etag)
    except StorageError as exc:
        if exc.reason is Reason.ConcurrentWrite:
            raise StorageError(
                f"{where} changed since the rollback read it (a job committed, or another "
                "rollback): nothing rolled back; read it again and rerun the rollback",
                reason=Reason.ConcurrentWrite,
            ) from None
        raise
    return _finish(state, to, manifest.set_id, doc, etag)


def _restored(state: PrefixState, to: str) -> dict[str, Any]:
    """The own manifest of set ``to`` (``<set folder>/manifest.json``), checked: it names
    that set, and every file it lists is inside the folder and present. Raises
    StorageError (SourceNotFound, ForeignObject, UnsafePath)."""
    own_uri = state.set_uri(to, MANIFEST)
    got = state.storage.read_bytes(own_uri, MAX_MANIFEST_BYTES)
    if got is None:
        raise StorageError(f"{own_uri} is gone: set {to} cannot be restored",
                           reason=Reason.SourceNotFound)  # fmt: skip
    own = parse_manifest(got[0], own_uri)
    if own.set_id != to:
        raise StorageError(f"{own_uri} names set {own.set_id}, not {to}",
                           reason=Reason.ForeignObject)  # fmt: skip
    folder = set_dir(to, state.home)
    listed = [e for e in [*own.data["artifacts"], own.data.get("report") or {}]
              if isinstance(e, dict) and isinstance(e.get("path"), str)]  # fmt: skip
    outside = sorted(e["path"] for e in listed if not e["path"].startswith(folder))
    if outside:
        raise StorageError(f"{own_uri} lists {outside[:3]}, outside its set folder {folder}",
                           reason=Reason.UnsafePath)  # fmt: skip
    missing = sorted(e["path"] for e in listed if e["path"][len(folder) :] not in state.sets[to])
    if missing:
        raise StorageError(f"set {to} under {state.prefix} lost {missing[:3]}: not restored",
                           reason=Reason.SourceNotFound)  # fmt: skip
    return dict(own.data)


def _finish(
    state: PrefixState, to: str, previous: str, doc: dict[str, Any], etag: str | None
) -> RollbackOutcome:
    """Bring the fixed names in step with set ``to`` (the manifest ``doc``, read or written
    with ``etag``), then take ``rollbackPending`` off the manifest and abort what a killed
    earlier rollback left unfinished. Raises StorageError(ConcurrentWrite) when a job
    committed meanwhile: its set is current, not ``to``."""
    storage, prefix, home = state.storage, state.prefix, state.home
    synced = sync_mirrors(storage, prefix, home)
    superseded = (
        f"{prefix}: set {synced.set_id} was committed while the rollback to {to} brought the "
        f"fixed names in step; {synced.set_id} is current (rerun the rollback to go back "
        "from it)"
    )
    if synced.set_id != to:
        raise StorageError(superseded, reason=Reason.ConcurrentWrite)
    if doc.get(PENDING_KEY):
        assert etag is not None  # read with the manifest, or returned by its write
        done = {k: v for k, v in doc.items() if k != PENDING_KEY}
        try:
            storage.write_bytes(join(prefix, manifest_key(home)), dumps(done), if_match=etag)
        except StorageError as exc:
            if exc.reason is Reason.ConcurrentWrite:
                raise StorageError(superseded, reason=Reason.ConcurrentWrite) from None
            raise
    try:  # a killed earlier rollback's temporary files and copies (a job would, later)
        abort_orphan_uploads(read_state(storage, prefix, home), Retention.from_env(), time.time())
    except StorageError as exc:
        LOG.warning("unfinished uploads under %s not cleaned: %s", prefix, exc)
    return RollbackOutcome(previous, to, synced)
