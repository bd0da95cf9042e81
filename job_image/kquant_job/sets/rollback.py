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
rolled-back manifest is written with ``rollbackPending`` until its fixed names are in step,
and keeps a record of the rollback (``rolledBackFrom``, ``rolledBackAt``; the restored set
is ``set``) that no publish carries over. So the same command run again, after a kill at
any point or after it finished, finishes that rollback (names, clean-up) and goes no
further: a killed rollback cleared ``rollbackPending`` and was then cleaning up, and the
rerun rolled back one set more (trial). A further step is asked for: ``again``, or
``from_set`` naming the set to leave, which a rerun does not repeat either.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kquant_api import Reason
from kquant_job.errors import StorageError
from kquant_job.report import now as report_now
from kquant_job.sets.layout import (
    LINEAGE_KEY,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    NEWER_KEY,
    Manifest,
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

__all__ = ["AT_KEY", "FROM_KEY", "PENDING_KEY", "RollbackOutcome", "rollback"]

LOG = logging.getLogger("kquant.publish")
PENDING_KEY = "rollbackPending"  # set while the rolled-back manifest's fixed names are synced
# The record of the last rollback: the set it left and when (the set it restored is the
# manifest's ``set``). A publish writes a manifest without them, so their presence says no
# run committed since: a rerun of the command finishes that rollback, it does not repeat it.
FROM_KEY = "rolledBackFrom"
AT_KEY = "rolledBackAt"


@dataclass
class RollbackOutcome:
    """What a rollback did: the set current before (``previous``), the set now current
    (``current``; the same when there was nothing to do) and the fixed-name sync.
    ``earlier``: the rollback from ``previous`` to ``current`` was made by an earlier run
    (at ``at``, RFC 3339; None for a manifest of a kquant that did not record it), this one
    only finished it: its fixed names when it was killed before they were in step
    (``pending``), else its clean-up."""

    previous: str
    current: str
    mirrors: MirrorOutcome
    earlier: bool = False
    pending: bool = False
    at: str | None = None


def rollback(
    storage: Storage,
    prefix: str,
    to: str | None = None,
    home: str = "",
    *,
    again: bool = False,
    from_set: str | None = None,
) -> RollbackOutcome:
    """Make set ``to`` (default: the set current before the current one, by the manifest's
    lineage) the current set of ``prefix`` (ending in '/'; ``home``: the folder of an output
    beside the originals, ``.kquant/beside-fp16/``) again.

    Retry-safe: when the last operation at the prefix was a rollback (no run committed
    since), the default, ``to`` naming the set it restored, or ``from_set`` naming the set
    it left, finish that rollback (fixed names, clean-up) and go no further (``earlier`` in
    the outcome). ``again`` goes one set further back from the current set all the same;
    ``from_set`` does too when it names the current set (a rerun then finds it left).

    Raises StorageError: SourceNotFound when the prefix has no kquant manifest, when ``to``
    is not a set the prefix still holds, or when there is no earlier set; ConcurrentWrite
    when the manifest changed since it was read, a job committed while the names were
    synced, or ``from_set`` is neither current nor the set the last rollback left;
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
    current = manifest.set_id
    if _repeats(manifest, to, again, from_set):
        return _finish_earlier(state, manifest)
    if from_set is not None and from_set != current:
        raise StorageError(
            f"{prefix}: set {from_set} is not current, {current} is{_last(manifest)}: "
            "nothing rolled back (name the set now current to go back from it)",
            reason=Reason.ConcurrentWrite,
        )
    held = [s for s in dict.fromkeys(h.set_id for h in manifest.history) if s in state.sets]
    if to is None:
        earlier = [s for s in line[1:] if s in held]
        if not earlier:
            raise StorageError(f"{prefix} holds no set before {current}",
                               reason=Reason.SourceNotFound)  # fmt: skip
        to = earlier[0]
    if to == current:
        return RollbackOutcome(to, to, _finish(state, to, manifest.data, state.etag))
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
    at = report_now()
    doc = {**doc, "history": [entries[i].to_json() for i in ids if i in entries],
           LINEAGE_KEY: new_line, FROM_KEY: current, AT_KEY: at, PENDING_KEY: True}  # fmt: skip
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
    return RollbackOutcome(current, to, _finish(state, to, doc, etag), at=at)


def _recorded(manifest: Manifest) -> str | None:
    """The set the last rollback left (``rolledBackFrom``), or None when a run committed
    since (or none was rolled back)."""
    left = manifest.data.get(FROM_KEY)
    return left if isinstance(left, str) and left else None


def _repeats(manifest: Manifest, to: str | None, again: bool, from_set: str | None) -> bool:
    """Whether this call asks for the rollback the manifest records as the last operation
    (a rerun: finish it, go no further)."""
    left = _recorded(manifest)
    if left is None and not manifest.data.get(PENDING_KEY):
        return False
    if to is not None and to != manifest.set_id:
        return False
    if from_set is not None:
        return from_set == left and from_set != manifest.set_id
    return not again or to is not None


def _last(manifest: Manifest) -> str:
    """`` (rolled back from X at T)`` for messages, or '' when no rollback is recorded."""
    left = _recorded(manifest)
    if left is None:
        return ""
    at = manifest.data.get(AT_KEY)
    return f" (rolled back from {left}" + (f" at {at})" if isinstance(at, str) else ")")


def _finish_earlier(state: PrefixState, manifest: Manifest) -> RollbackOutcome:
    """Finish the rollback the manifest records: its fixed names (``rollbackPending``) or
    only its clean-up. Raises StorageError(ConcurrentWrite) when a job committed
    meanwhile."""
    assert manifest.set_id is not None  # checked by the caller
    pending = bool(manifest.data.get(PENDING_KEY))
    at = manifest.data.get(AT_KEY)
    synced = _finish(state, manifest.set_id, manifest.data, state.etag)
    return RollbackOutcome(
        _recorded(manifest) or manifest.set_id,
        manifest.set_id,
        synced,
        earlier=True,
        pending=pending,
        at=at if isinstance(at, str) else None,
    )


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


def _finish(state: PrefixState, to: str, doc: dict[str, Any], etag: str | None) -> MirrorOutcome:
    """Bring the fixed names in step with set ``to`` (the manifest ``doc``, read or written
    with ``etag``), then take ``rollbackPending`` off the manifest and abort what a killed
    earlier rollback left unfinished; returns the sync's outcome. Raises
    StorageError(ConcurrentWrite) when a job committed meanwhile: its set is current, not
    ``to``."""
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
    return synced
