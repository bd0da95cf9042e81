"""Fixed-name copies: each file of the current set also at ``<prefix>/<name>``.

For readers that open a known file name instead of following ``manifest.json``. After a
manifest switch every fixed name of the new set is replaced by a copy of the set's file (a
server-side copy on S3; locally a copy that shares no data with the set's file, so a write
into the fixed name never reaches the set), each in one atomic step and only while the
name holds what kquant saw there (nothing, or the etag it checked): a reader of one name
gets the old file or the new one, whole, a name both sets share is never missing, and a
colleague's file written there meanwhile is left. Names only the old sets had are then
removed, if the object there is still the one kquant placed (conditional delete).

Several writers may sync one prefix in turn; a copy is always taken from the set the
manifest names at that moment, and each round ends by re-reading the manifest: a writer
whose copy landed after a newer set's switch sees the switch and copies again, so the names
converge on the manifest's set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kquant_api import Reason
from kquant_job.errors import StorageError
from kquant_job.sets.layout import KQUANT_DIR, SET_KEY, manifest_key
from kquant_job.sets.state import PrefixState, owned, read_state
from kquant_job.storage.base import ObjectInfo, Storage

LOG = logging.getLogger("kquant.publish")
MAX_ROUNDS = 5


@dataclass
class MirrorOutcome:
    """What a sync did: names copied and removed, foreign objects left alone at fixed names
    of the set, and the set the names now follow (None: no manifest, or kquant's first
    layout, which has no set folder to copy from)."""

    set_id: str | None = None
    copied: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


def in_sync(state: PrefixState, name: str, info: ObjectInfo, set_id: str, sha256: str) -> bool:
    """The object ``info`` at the fixed name ``name`` already is set ``set_id``'s file: it
    carries the set id (S3), shares the source's etag where etags name content (an S3 copy
    of the same bytes), or, locally, holds the bytes the manifest names (hashed: a local
    etag names the file, not its bytes) in a file of its own: a hard link an earlier kquant
    made is copied again, or a colleague's ``cp`` over it would still rewrite the set."""
    if info.linked or info.symlink:  # a hard link an earlier kquant made; a colleague's link
        return False
    if info.metadata.get(SET_KEY) == set_id:
        return True
    source = state.sets.get(set_id, {}).get(name)
    if state.storage.content_etags:
        return source is not None and source.etag is not None and info.etag == source.etag
    return state.content_sha256(name, info) == sha256


def _sync_once(state: PrefixState, outcome: MirrorOutcome) -> list[str]:
    """One round over the manifest's names; returns those written by someone else between
    their stat and kquant's copy (the next round looks at them again)."""
    contested: list[str] = []
    outcome.foreign = []  # this round's judgement, on this round's manifest, stands
    manifest = state.manifest
    assert manifest is not None and manifest.set_id is not None
    set_id = manifest.set_id
    for name, sha256 in sorted(manifest.files.items()):
        if name.startswith(KQUANT_DIR):
            continue  # a report kept in its set folder (shared prefixes): no fixed name
        uri = state.uri(name)
        if not state.storage.within(state.prefix, name):  # through a linked folder: outside
            if name not in outcome.foreign:
                outcome.foreign.append(name)
            continue
        info = state.storage.stat(uri)
        if info is not None and in_sync(state, name, info, set_id, sha256):
            continue
        if info is not None and not owned(state, name, info):
            if name not in outcome.foreign:
                outcome.foreign.append(name)
            continue
        source = state.set_uri(set_id, name)
        try:
            state.storage.copy(
                source, uri, {SET_KEY: set_id, "sha256": sha256},
                absent=info is None, if_match=info.etag if info is not None else None,
            )  # fmt: skip
        except StorageError as exc:
            if exc.reason is not Reason.ConcurrentWrite:
                raise
            contested.append(name)  # written at the name since the stat: look again
            continue
        outcome.copied.append(name)
    for name in sorted(manifest.owned_names() - set(manifest.files)):
        if name.startswith(KQUANT_DIR):
            continue  # inside a set folder: removed with its set, never as a fixed name
        uri = state.uri(name)
        if not state.storage.within(state.prefix, name):
            continue  # never removed through a linked folder
        info = state.storage.stat(uri)
        if info is None or not owned(state, name, info):
            continue
        try:
            state.storage.delete(uri, if_match=info.etag)
            outcome.removed.append(name)
        except StorageError as exc:
            if exc.reason is not Reason.ConcurrentWrite:
                raise  # replaced since the stat: no longer ours to remove
            continue
        if "/" in name:  # a variant's or a model folder's: left empty locally (trial)
            state.storage.prune(state.uri(name.rsplit("/", 1)[0] + "/"))
    return contested


def sync_mirrors(storage: Storage, prefix: str, home: str = "") -> MirrorOutcome:
    """Bring the fixed names under ``prefix`` in step with its manifest (see the module
    docstring); at most MAX_ROUNDS rounds while other writers keep switching it. Raises
    the storage's errors; a rerun resumes where an interrupted sync stopped."""
    outcome = MirrorOutcome()
    contested: list[str] = []
    for _ in range(MAX_ROUNDS):
        state = read_state(storage, prefix, home)
        if state.manifest is None or state.manifest.set_id is None:
            return outcome
        outcome.set_id = state.manifest.set_id
        if outcome.set_id not in state.sets:
            raise StorageError(
                f"{prefix}{manifest_key(home)} names set {outcome.set_id}, whose folder is gone",
                reason=Reason.StorageUnavailable,
            )
        contested = _sync_once(state, outcome)
        again = storage.stat(state.uri(manifest_key(home)))
        if (again is None or again.etag == state.etag) and not contested:
            break
    # still written by someone else at each look (a name a colleague keeps rewriting, a
    # folder there): not in step, and said so, not passed over in silence (trial)
    outcome.foreign += [n for n in contested if n not in outcome.foreign]
    if outcome.foreign:
        LOG.warning(
            "left %d foreign object(s) at fixed names of the set",
            len(outcome.foreign),
            extra={"fields": {"prefix": prefix, "names": outcome.foreign[:5]}},
        )
    return outcome
