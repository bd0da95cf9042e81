"""What a publish prefix holds, who owns each object, and reclaiming kquant's own leftovers.

kquant deletes or replaces only what it wrote itself:

- ``manifest.json`` when it parses as a kquant ModelManifest;
- everything below ``.kquant/sets/`` (set folders, each opened by its ``set.json`` marker);
- an object at a fixed name that a retained set placed there, recognised by the set id in
  its metadata (S3), by being a hard link of the set's file (local), or by its sha256.

Anything else under the prefix is foreign: never touched, and a write that would have to
replace it is refused (ForeignObject).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from kquant_api import Reason
from kquant_job.errors import StorageError
from kquant_job.report import now as report_now
from kquant_job.sets.layout import (
    KQUANT_DIR,
    MARKER,
    MAX_MANIFEST_BYTES,
    SET_KEY,
    Manifest,
    Retention,
    Writer,
    dumps,
    manifest_key,
    parse_manifest,
    parse_time,
    set_dir,
    set_id_of,
    sets_key,
)
from kquant_job.storage.base import ObjectInfo, Storage, join
from kquant_job.storage.paths import TEMP_SUFFIX, temp_target

LOG = logging.getLogger("kquant.publish")
# An unfinished write outside set folders (a fixed-name copy or a manifest write in progress)
# older than this was left by a killed writer, whatever the store says of its writer.
TEMP_GRACE_SECONDS = 3600.0


@dataclass
class PrefixState:
    """A prefix as read at one moment: its manifest (None when absent) and that object's
    etag, and the objects of every set folder by set id (keys relative to the set folder)."""

    storage: Storage
    prefix: str
    manifest: Manifest | None
    etag: str | None
    sets: dict[str, dict[str, ObjectInfo]] = field(default_factory=dict)
    home: str = ""
    _digests: dict[tuple[str, str], str | None] = field(default_factory=dict, repr=False)

    def uri(self, key: str) -> str:
        """The URI of ``key`` (relative to the prefix)."""
        return join(self.prefix, key)

    def set_uri(self, set_id: str, rel: str = "") -> str:
        """The URI of ``rel`` in a set folder (the folder itself for '')."""
        return self.uri(set_dir(set_id, self.home) + rel)

    def content_sha256(self, key: str, info: ObjectInfo) -> str | None:
        """Hex SHA-256 of the object ``info`` (from ``stat``) at ``key``
        (:meth:`Storage.content_sha256`), read once per version: a local file is hashed in
        full, and a mirror sync asks first whether it is in sync, then whether it is owned.
        None: unreadable."""
        if info.etag is None:
            return self.storage.content_sha256(self.uri(key), info)
        if (key, info.etag) not in self._digests:
            self._digests[key, info.etag] = self.storage.content_sha256(self.uri(key), info)
        return self._digests[key, info.etag]


def read_state(storage: Storage, prefix: str, home: str = "") -> PrefixState:
    """Read ``prefix`` (ending in '/'): its manifest and its set folders (in ``home``, see
    :func:`kquant_job.sets.layout.manifest_key`).

    Raises StorageError(ForeignObject) when ``manifest.json`` is not kquant's, and the
    storage's errors (SourceNotFound for a missing bucket...)."""
    uri = join(prefix, manifest_key(home))
    try:
        got = storage.read_bytes(uri, MAX_MANIFEST_BYTES)
    except StorageError as exc:
        if exc.reason is not Reason.SourceTooLarge:
            raise
        raise StorageError(
            f"{uri} is larger than any kquant manifest: not replacing it",
            reason=Reason.ForeignObject,
        ) from None
    manifest = parse_manifest(got[0], uri) if got else None
    sets: dict[str, dict[str, ObjectInfo]] = {}
    for obj in storage.list(join(prefix, sets_key(home))):
        set_id, _, rel = obj.key.partition("/")
        if rel:
            sets.setdefault(set_id, {})[rel] = obj
    return PrefixState(storage, prefix, manifest, got[1] if got else None, sets, home)


def owned(state: PrefixState, name: str, info: ObjectInfo) -> bool:
    """Whether the object ``info`` (from ``stat``) at the fixed name ``name`` was placed there
    by a set the manifest retains: by its set metadata, by sharing the etag of that set's
    file where etags name content (S3's copy of one object), or by content (sha256). A local
    etag names the file: a hard link made by an earlier kquant shares it even after someone
    rewrote the file in place, so locally only the content counts."""
    entries = state.manifest.naming(name) if state.manifest else []
    if not entries or info.symlink:  # kquant never makes a symlink: a colleague's (trial)
        return False
    for entry in entries:
        if entry.set_id and info.metadata.get(SET_KEY) == entry.set_id:
            return True
        source = state.sets.get(entry.set_id, {}).get(name)
        same = source is not None and info.etag and source.etag == info.etag
        if same and state.storage.content_etags:
            return True
    digest = state.content_sha256(name, info)
    return digest is not None and any(entry.files[name] == digest for entry in entries)


# Keys looked at when searching a prefix for foreign objects: a bucket root may hold millions.
FOREIGN_SCAN = 1000


def foreign_objects(state: PrefixState, limit: int = 3) -> list[str]:
    """Up to ``limit`` keys under the prefix that kquant did not write (see the module
    docstring), among its first FOREIGN_SCAN keys: to refuse an output prefix that is not
    empty, or to report what a replacement left alone."""
    found = []
    owned_names = state.manifest.owned_names() if state.manifest else set()
    for obj in state.storage.list(state.prefix, limit=FOREIGN_SCAN):
        if obj.key.startswith(KQUANT_DIR) or (
            obj.key == manifest_key(state.home) and state.manifest
        ):
            continue
        if obj.key in owned_names:
            info = state.storage.stat(state.uri(obj.key))
            if info is not None and owned(state, obj.key, info):
                continue
        found.append(obj.key)
        if len(found) >= limit:
            break
    return found


def _marker(state: PrefixState, set_id: str) -> dict | None:
    if MARKER not in state.sets.get(set_id, {}):
        return None
    got = state.storage.read_bytes(state.set_uri(set_id, MARKER), 1024 * 1024)
    try:
        doc = json.loads(got[0]) if got else None
    except (UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def reclaim_reason(
    marker: dict | None, writer: Writer, retention: Retention, now: float, set_id: str = ""
) -> str | None:
    """Why an uncommitted set folder (not in the manifest's history) may be removed by
    ``writer``, or None to leave it (another live writer's set, perhaps). ``set_id`` begins
    with the folder's creation time (:func:`~kquant_job.sets.layout.new_set_id`)."""
    if marker is None:
        # A writer may be creating its marker right now (a local write goes through a
        # temporary file in the folder): a folder without one is left while its lease runs.
        return "no marker: an interrupted clean-up" if _lease_over(set_id, retention, now) else None
    owner = Writer.from_ref(marker.get("job") or {})
    if marker.get("state") == "failed" and owner.same_job(writer):
        return "the report of an earlier failed run of this job"  # written as that run ended
    # the lease runs from its last renewal (kquant_job.sets.lease)
    times = [parse_time(marker.get(k)) for k in ("startedAt", "renewedAt")]
    started = max((t for t in times if t is not None), default=None)
    # Another run of this job may be alive beside this one: its set is removed once its
    # lease is over (Retention.live_seconds), when it can no longer commit it. An earlier
    # generation's too (a run killed at its commit left its set for a day); a newer
    # generation's set is never this run's to remove.
    lease_over = started is not None and now - started > 2 * retention.live_seconds
    mine = owner.same_job(writer) and not owner.newer_than(writer)
    if mine and owner.run_id != writer.run_id and lease_over:
        return "left by an earlier run of this job"
    if started is not None and now - started > retention.abandoned_seconds:
        renewed = f", last renewed {marker['renewedAt']}" if marker.get("renewedAt") else ""
        return f"abandoned (started {marker.get('startedAt')}{renewed})"
    return None


def _lease_over(set_id: str, retention: Retention, now: float) -> bool:
    """Whether the set folder ``set_id`` is older than twice ``retention.live_seconds``, by
    the creation time its id begins with (``20261207T043411Z-...``,
    :func:`~kquant_job.sets.layout.new_set_id`); True for an id that does not parse."""
    c = set_id
    born = parse_time(f"{c[0:4]}-{c[4:6]}-{c[6:8]}T{c[9:11]}:{c[11:13]}:{c[13:15]}Z")
    return born is None or now - born > 2 * retention.live_seconds


def delete_set(state: PrefixState, set_id: str) -> int | None:
    """Delete a set folder: its marker first, conditional on the etag ``state`` listed,
    which claims the folder (a writer that renewed its lease since keeps it: None is
    returned and nothing is deleted; before, the marker went last and a renewal in between
    failed the remover's whole publish after some of the set's files were gone), then its
    other objects and unfinished uploads, then (local storage) its empty folders. A folder
    left without a marker by an interrupted deletion is reclaimed as an interrupted
    clean-up (:func:`reclaim_reason`). Returns the number of objects deleted."""
    objects = state.sets.get(set_id, {})
    rels = sorted(rel for rel in objects if rel != MARKER)
    if MARKER in objects:
        try:
            state.storage.delete(state.set_uri(set_id, MARKER), if_match=objects[MARKER].etag)
        except StorageError as exc:
            if exc.reason is not Reason.ConcurrentWrite:
                raise
            return None
    for rel in rels:
        uri = state.set_uri(set_id, rel)
        try:
            state.storage.delete(uri, if_match=objects[rel].etag)
        except StorageError as exc:  # rewritten since listed: still this claimed set's
            if exc.reason is not Reason.ConcurrentWrite:
                raise
            state.storage.delete(uri)
    folder = state.set_uri(set_id)
    for upload in state.storage.list_uploads(folder):
        state.storage.abort_upload(folder, upload)
    state.storage.prune(folder)
    state.sets.pop(set_id, None)
    return len(rels) + (MARKER in objects)


def _ours(state: PrefixState, key: str) -> bool:
    """Whether an unfinished write outside the set folders may be kquant's: a local
    temporary file in kquant's name format (:func:`~kquant_job.storage.paths.temp_path`),
    never one merely ending in ``.kquant-part``; else only the manifest or a fixed name
    kquant placed (a copy is made after its set is committed, so its name is in the
    manifest). Any other upload is someone else's, on kquant's own prefix too: a
    colleague's multipart upload under a promotion prefix was aborted as an hour old."""
    name = key.rpartition("/")[2]
    if name.endswith(TEMP_SUFFIX):
        # kquant's temporary files carry its whole name format (temp_path: target, host tag,
        # pid, random): a file merely ending in the suffix is someone else's
        return temp_target(name) is not None
    owned_names = state.manifest.owned_names() if state.manifest else set()
    return key == manifest_key(state.home) or key in owned_names


def fence(state: PrefixState, writer: Writer) -> bool:
    """Change the manifest's etag (rewriting it with ``fencedAt``/``fencedBy`` set), against
    the etag ``state`` read, before removing an uncommitted set whose writer may still be
    about to commit it. That commit is conditional on the etag its writer read
    (``If-Match``), so a commit delayed past its lease (a frozen process, a PUT held in a
    proxy) fails once the fence stands. Returns whether it stands: False when the prefix has
    no manifest (no etag to change: the set waits for a run that finds one, the committing
    run itself after its commit) or when the manifest changed since ``state`` was read (a
    commit landed meanwhile, perhaps of the very set about to be removed: fault-injection
    trial, where a reclaimer whose fence failed went on to delete a set just committed).
    Updates ``state.etag``."""
    if state.manifest is None or state.etag is None:
        return False
    doc = {**state.manifest.data, "fencedAt": report_now(), "fencedBy": writer.describe()}
    uri = state.uri(manifest_key(state.home))
    try:
        state.etag = state.storage.write_bytes(uri, dumps(doc), if_match=state.etag)
    except StorageError as exc:
        if exc.reason is not Reason.ConcurrentWrite:
            raise
        return False
    LOG.info("fenced the manifest before reclaiming", extra={"fields": {"prefix": state.prefix}})
    return True


def reclaim(state: PrefixState, writer: Writer, retention: Retention) -> list[str]:
    """Remove what earlier runs left under the prefix that ``writer`` may remove: uncommitted
    set folders of an earlier run of the same job and generation once their lease is over
    (twice ``retention.live_seconds``), failure reports of the same job, set folders
    abandoned for longer than ``retention.abandoned_seconds``; and
    unfinished uploads belonging to none of the remaining sets. Committed sets (in the
    manifest's history) and the live sets of other writers are left alone. Returns one line
    per removed set, for the log."""
    now = time.time()
    kept = {h.set_id for h in state.manifest.history} if state.manifest else set()
    removed = []
    fenced: bool | None = None  # not tried yet
    for set_id in sorted(state.sets):
        if set_id in kept:
            continue
        marker = _marker(state, set_id)
        why = reclaim_reason(marker, writer, retention, now, set_id)
        if not why:
            continue
        if (marker or {}).get("state") != "failed":  # its writer may yet commit it
            fenced = fence(state, writer) if fenced is None else fenced
            if not fenced:
                LOG.info("left set %s for a later run: %s; no fence stands", set_id, why,
                         extra={"fields": {"prefix": state.prefix}})  # fmt: skip
                continue
        count = delete_set(state, set_id)
        if count is not None:
            removed.append(f"{set_id}: {why} ({count} objects)")
    removed += abort_orphan_uploads(state, retention, now)
    for line in removed:
        LOG.info("reclaimed %s", line, extra={"fields": {"prefix": state.prefix}})
    return removed


def abort_orphan_uploads(state: PrefixState, retention: Retention, now: float) -> list[str]:
    """Abort the unfinished writes under the prefix that are kquant's and whose writer is
    gone (:func:`reclaim`'s rules; also after a killed ``kquant-job rollback``, whose
    manifest and copies left them). Returns one line per aborted upload."""
    removed = []
    for upload in state.storage.list_uploads(state.prefix):
        set_id = set_id_of(upload.key, state.home)
        if set_id is not None:
            # A writer creates its marker before any upload: an upload without one belongs
            # to a set that was reclaimed (asked now, not from the listing above), unless it
            # is the marker's own write in progress (a local temporary file) by a live writer.
            marked = set_id in state.sets or state.storage.stat(state.set_uri(set_id, MARKER))
            orphan = not marked and (
                upload.writer_alive is False or _lease_over(set_id, retention, now)
            )
        elif not _ours(state, upload.key):
            orphan = False  # someone else's upload: theirs to finish or abort
        else:  # a fixed-name copy or a manifest write in progress, or a dead writer's
            age = now - upload.initiated if upload.initiated is not None else 0.0
            orphan = upload.writer_alive is False or age > TEMP_GRACE_SECONDS
        if orphan:
            state.storage.abort_upload(state.prefix, upload)
            removed.append(f"unfinished upload {upload.key}")
    return removed
