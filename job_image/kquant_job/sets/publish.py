"""Publishing a validated set to a prefix (the output, or the promotion) without ever
destroying or mixing data.

A :class:`Target` is one prefix this run writes. :meth:`Target.preflight` reads it before any
work (refusing a prefix that is not this run's to write) and remembers the manifest's etag.
:meth:`Target.publish` then:

1. finishes the fixed-name copies an interrupted run left (its set may drop out of the
   history with this commit); reclaims this job's own leftovers
   (:func:`kquant_job.sets.state.reclaim`);
2. refuses a fixed name held by an object kquant did not write (ForeignObject);
3. writes a new set folder: ``set.json`` first, the artifacts, ``report.json``, the set's
   ``manifest.json``, and checks the folder is complete;
4. commits: one conditional write of ``<prefix>/manifest.json`` against the etag read at
   preflight (``If-Match``, or ``If-None-Match: *`` when there was none). Exactly one of
   several concurrent writers succeeds; the others end with ConcurrentWrite, except a newer
   generation of the same job, which takes over from an older one (and an older one never
   replaces a newer one: Superseded);
5. brings the fixed-name copies in step (:mod:`kquant_job.sets.mirrors`) and removes the sets
   that dropped out of the manifest's history.

A kill at any step leaves the prefix as it was or with the new set complete; the next run of
any job on the prefix finishes the copies, and a rerun of the same job reclaims its own
uncommitted sets.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kquant_api import Artifact, Reason
from kquant_job.errors import StorageError
from kquant_job.report import now
from kquant_job.sets.layout import (
    MANIFEST,
    MARKER,
    REPORT,
    SET_KEY,
    HistoryEntry,
    Manifest,
    Retention,
    Writer,
    build_manifest,
    build_marker,
    dumps,
    lineage,
    manifest_key,
    new_set_id,
    set_dir,
)
from kquant_job.sets.lease import Lease, write_marker
from kquant_job.sets.mirrors import MirrorOutcome, sync_mirrors
from kquant_job.sets.state import (
    PrefixState,
    delete_set,
    foreign_objects,
    owned,
    read_state,
    reclaim,
)
from kquant_job.storage.base import Storage, join
from kquant_job.storage.paths import check_keys

LOG = logging.getLogger("kquant.publish")
MAX_COMMIT_TRIES = 4


@dataclass(frozen=True)
class PublishedSet:
    """A committed set: its id, artifacts (URIs inside the immutable set folder, sha256,
    bytes), the report's URI there, the prefix's manifest URI and the fixed-name sync (with
    ``copies_error`` when it failed after the commit)."""

    set_id: str
    artifacts: list[Artifact]
    report_uri: str
    manifest_uri: str
    mirrors: MirrorOutcome = field(default_factory=MirrorOutcome)
    # Why the fixed names are not yet in step with the committed manifest (a storage error
    # after the commit; the next run finishes them), or None.
    copies_error: str | None = None


def as_prefix(uri: str) -> str:
    """``uri`` with exactly one trailing '/'."""
    return uri.rstrip("/") + "/"


class Target:
    """One prefix this run writes.

    ``replace``: the prefix may hold an earlier set of kquant's, which this run replaces (a
    promotion; an output with ``overwrite: true``). Without it (a fresh output) the prefix
    must hold nothing but kquant's own bookkeeping and, at most, a set of this very job and
    generation (an earlier run of it that was interrupted).

    ``home`` (shared prefixes): the prefix also holds other people's files (the originals,
    when converted models are written beside them), so kquant's manifest and set folders live
    in ``home`` (``.kquant/beside-fp16/``), the report gets no fixed name, objects kquant did
    not write are expected (never touched; a fixed name or folder of the set holding one is
    ForeignObject) and only kquant's own unfinished writes are reclaimed.
    """

    def __init__(
        self,
        storage: Storage,
        prefix_uri: str,
        writer: Writer,
        *,
        replace: bool,
        field_name: str,
        retention: Retention | None = None,
        home: str = "",
    ) -> None:
        self.storage, self.prefix, self.writer = storage, as_prefix(prefix_uri), writer
        self.replace, self.field_name, self.home = replace, field_name, home
        self.retention = retention or Retention.from_env()
        self.base_etag: str | None = None
        self._keep_history = False  # set by publish: names behind, no set dropped

    def _state(self) -> PrefixState:
        return read_state(self.storage, self.prefix, self.home)

    def preflight(self) -> None:
        """Read the prefix and refuse what publishing would refuse: OutputExists (a fresh
        output that holds objects, or another job's set), Superseded (a newer generation of
        this job published here), ForeignObject (a manifest.json that is not kquant's).
        Remembers the manifest's etag for the commit."""
        state = self._state()
        self._check(state)
        self.base_etag = state.etag

    def _check(self, state: PrefixState) -> None:
        if self.storage.occupied(state.uri(manifest_key(self.home))):
            raise StorageError(
                f"{self.field_name} {self.prefix}: {manifest_key(self.home)!r} is held by a "
                "folder, link or special file: kquant never replaces it (move it, or choose "
                "another prefix)",
                reason=Reason.ForeignObject,
            )
        current = state.manifest
        if current is not None and current.fence(self.writer).newer_than(self.writer):
            raise StorageError(
                f"{self.field_name} {self.prefix} holds the set of a newer generation, "
                f"{current.fence(self.writer).describe()} (current, or kept behind a "
                f"rollback): this run of generation {self.writer.generation} does not "
                "replace it",
                reason=Reason.Superseded,
            )
        if self.replace:
            return
        if current is not None and not current.writer.same_generation(self.writer):
            other = ""
            if current.writer.same_job(self.writer) and current.writer.spec:
                other = (" of another spec under this metadata.name: outside a cluster a "
                         "job is its name and its spec")  # fmt: skip
            raise StorageError(
                f"output {self.prefix} already holds a set ({current.writer.describe()}){other}; "
                "set spec.output.overwrite: true to replace it, or choose a new prefix",
                reason=Reason.OutputExists,
            )
        foreign = [] if self.home else foreign_objects(state)
        if foreign:
            raise StorageError(
                f"output {self.prefix} already holds objects kquant did not write (e.g. "
                f"{', '.join(foreign)}); choose an empty prefix: kquant never replaces them",
                reason=Reason.OutputExists,
            )

    def _check_names(
        self, state: PrefixState, names: list[str], folders: Sequence[str] = ()
    ) -> None:
        """Refuse (ForeignObject) a fixed name of the set, or an object inside one of
        ``folders`` (the set's own folders, '/'-terminated), that kquant did not write."""
        found = list(names)
        for folder in folders:
            found += [folder + o.key for o in self.storage.list(state.uri(folder))]
        for name in found:
            info = self.storage.stat(state.uri(name))
            if info is None and self.storage.occupied(state.uri(name)):
                raise StorageError(
                    f"{self.field_name} {self.prefix}: {name!r} is held by a folder, link or "
                    "special file, where kquant must write a file: move it, or choose "
                    "another prefix",
                    reason=Reason.ForeignObject,
                )
            if info is None or owned(state, name, info):
                continue
            # Another writer may have committed since ``state`` was read and placed its
            # copies: that is ConcurrentWrite naming it, not someone's object (trial: two
            # jobs publishing to one prefix, the loser told to move kquant's own report.json).
            self._resolve(self._state(), "")
            where = (f"folder {name.rsplit('/', 1)[0]}/ holds {name!r}, an object" if "/" in name
                     else f"{name!r} holds an object")  # fmt: skip
            raise StorageError(
                f"{self.field_name} {self.prefix}: {where} kquant did not write; kquant never "
                "replaces it or mixes files into its folder (move it, or choose another prefix)",
                reason=Reason.ForeignObject,
            )

    def may_clash(self) -> bool:
        """Whether a name this set needs could hold an object kquant did not write: the
        prefix holds such objects (always, beside the originals: a shared folder). Reads
        the prefix."""
        return bool(self.home) or bool(foreign_objects(self._state(), limit=1))

    def check_free(self, names: list[str], folders: Sequence[str] = ()) -> None:
        """Read-only: raise what :meth:`publish` would raise for these fixed names (and the
        report's, on a prefix of kquant's own) and folders: ForeignObject. For the dry run."""
        self._check_names(self._state(), names if self.home else [*names, REPORT], folders)

    def _resolve(self, state: PrefixState, set_id: str) -> bool:
        """Whether the manifest now in ``state`` may be replaced by this run's commit; True
        when it already is this run's set. Raises Superseded or ConcurrentWrite otherwise."""
        current = state.manifest
        if current is not None and current.set_id == set_id:
            return True
        if state.etag == self.base_etag:
            return False
        if current is not None and current.fence(self.writer).newer_than(self.writer):
            self._check(state)  # raises Superseded
        older = current is None or self.writer.newer_than(current.fence(self.writer))
        if self.replace and older:
            self.base_etag = state.etag  # a newer generation takes over from an older one
            return False
        winner = current.writer.describe() if current else "a writer that removed it"
        done = "published there first"
        if current is not None and current.data.get("rolledBackFrom"):
            winner, done = "a rollback (kquant-job rollback)", f"made set {current.set_id} current"
        raise StorageError(
            f"{self.field_name} {self.prefix} changed while this job ran: {winner} "
            f"{done}; this run's set was withdrawn",
            reason=Reason.ConcurrentWrite,
        )

    def publish(
        self,
        staged: Path,
        rels: list[str],
        report: dict[str, Any],
        fields: dict[str, Any],
        folders: Sequence[str] = (),
    ) -> PublishedSet:
        """Publish the staged files ``rels`` ('/'-separated, relative to ``staged``) with
        ``report`` as one set, per the module docstring; ``fields`` are the manifest's own
        entries (precision, source, validation...); ``folders`` the set's own folders, which
        must hold nothing kquant did not write. Call :meth:`preflight` first.

        Raises StorageError: UnsafePath (a bad or reserved path), SourceNotFound (a staged
        file missing), ForeignObject, OutputExists, Superseded, ConcurrentWrite, and the
        storage's errors."""
        names = _check_files(rels, staged, self.prefix)
        # names still holding an older set's copies keep every set in the history: dropped,
        # its copies would count as someone else's, and every later run failed (trial)
        self._keep_history = not self._finish_copies()
        state = self._state()
        self._resolve(state, "")  # another writer committed since preflight: who?
        self._check(state)
        before, unfenced = state.etag, state.manifest is None
        reclaim(state, self.writer, self.retention)
        if state.etag != before:  # reclaiming fenced the manifest: commit against its new etag
            self.base_etag = state.etag
        self._check_names(state, names if self.home else [*names, REPORT], folders)
        set_id = new_set_id()
        folder = join(self.prefix, set_dir(set_id, self.home))
        meta = {SET_KEY: set_id}
        marker = build_marker(set_id, self.writer, "writing", now())
        lease = Lease(self.storage, join(folder, MARKER), marker, self.retention.live_seconds)
        with lease:
            artifacts = [self.storage.upload(staged / r, join(folder, r), meta) for r in names]
            report_bytes = dumps(report)
            self.storage.write_bytes(join(folder, REPORT), report_bytes, metadata=meta)
            report_art = Artifact(
                uri=join(folder, REPORT), sha256=_sha256(report_bytes), bytes=len(report_bytes)
            )
            entries = [self._entry(set_id, r, a) for r, a in zip(names, artifacts, strict=True)]
            report_entry = self._entry(set_id, REPORT, report_art)
            if self.home:  # no fixed name on a shared prefix: the report stays in its set
                report_entry["name"] = report_entry["path"]
            files = {e["name"]: e["sha256"] for e in entries}
            files[report_entry["name"]] = report_art.sha256
            try:
                dropped = self._commit(state, set_id, fields, entries, report_entry, files, lease)
            except StorageError:
                lease.release()
                self._withdraw(set_id)
                raise
        # Committed: the manifest names the set whatever happens now. A storage error from
        # here on is no failure of the publication (it was reported as one, and GitOps saw
        # Failed for a live model: trial); the copies are finished by the next run.
        mirrors, copies_error = MirrorOutcome(set_id=set_id), None
        try:
            mirrors = sync_mirrors(self.storage, self.prefix, self.home)
        except StorageError as exc:
            copies_error = str(exc)
            LOG.warning(
                "set %s is committed under %s, but its fixed names are not all in step (the "
                "next run finishes them): %s", set_id, self.prefix, exc,
            )  # fmt: skip
        if copies_error is None:  # names of a dropped set may still stand: keep its folder
            try:
                self._drop(dropped)
            except StorageError as exc:  # a later run reclaims the folders
                LOG.warning("could not remove the sets the commit dropped: %s", exc)
        if unfenced:  # a set left for want of a manifest to fence: there is one now
            try:
                reclaim(self._state(), self.writer, self.retention)
            except StorageError as exc:  # the set is published; a later run reclaims
                LOG.warning("could not reclaim after the commit: %s", exc)
        if self.replace and not self.home:
            try:  # a warning only: the set is published, whatever the listing meets now
                left = foreign_objects(self._state(), limit=5)
            except StorageError as exc:
                left = [f"(not listed: {exc})"]
            if left:
                LOG.warning(
                    "left objects kquant did not write untouched under %s",
                    self.prefix,
                    extra={"fields": {"examples": left}},
                )
        LOG.info(
            "published set %s to %s",
            set_id,
            self.prefix,
            extra={"fields": {"artifacts": len(artifacts), "copies": len(mirrors.copied)}},
        )
        manifest_uri = join(self.prefix, manifest_key(self.home))
        return PublishedSet(set_id, artifacts, report_art.uri, manifest_uri, mirrors, copies_error)

    def _finish_copies(self) -> bool:
        """Bring the fixed names in step with the manifest as it is, before this run commits:
        a writer killed between its commit and its copies left names of the set before, and
        once this commit drops that set from the history they were no longer recognised as
        kquant's (every later run then ended in ForeignObject: fault-injection trial). A
        failure is logged: this run's own sync after its commit tries again, and its commit
        then drops no set from the history. Returns whether the names are in step."""
        try:
            sync_mirrors(self.storage, self.prefix, self.home)
        except StorageError as exc:
            LOG.warning("could not finish an earlier run's copies under %s: %s", self.prefix, exc)
            return False
        return True

    def _commit(
        self,
        state: PrefixState,
        set_id: str,
        fields: dict[str, Any],
        artifacts: list[dict[str, Any]],
        report: dict[str, Any],
        files: dict[str, str],
        lease: Lease,
    ) -> list[str]:
        """Commit the set; returns the ids of the sets its history no longer keeps. Once
        ``lease`` is no longer held it does not: another run of the job may remove an
        uncommitted set after that (ConcurrentWrite)."""
        uri = join(self.prefix, manifest_key(self.home))
        dropped: list[str] = []
        for _ in range(MAX_COMMIT_TRIES):
            if self._resolve(state, set_id):
                return dropped
            history, line = _history(state.manifest, set_id, self.writer, files,
                                     self.retention, keep_all=self._keep_history)  # fmt: skip
            before = [h.set_id for h in state.manifest.history] if state.manifest else []
            dropped = [s for s in before if s and s not in {h.set_id for h in history}]
            doc = build_manifest(fields, set_id, self.writer, artifacts, report, history, line)
            data = dumps(doc)
            self.storage.write_bytes(join(self.prefix, set_dir(set_id, self.home) + MANIFEST), data)
            folder = set_dir(set_id, self.home)
            rels = [e["path"].removeprefix(folder) for e in [*artifacts, report]]
            self._verify(set_id, [*rels, MANIFEST, MARKER])
            if not lease.held():
                raise StorageError(
                    f"{self.field_name} {self.prefix}: the lease on set {set_id} lapsed (its "
                    f"marker not renewed within {self.retention.live_seconds:g} s, "
                    "KQUANT_LIVE_SET_SECONDS, or removed by another run of this job, which "
                    "may remove the set after that), so it is withdrawn",
                    reason=Reason.ConcurrentWrite,
                )
            LOG.info("committing set %s", set_id, extra={"fields": {"prefix": self.prefix}})
            try:
                if self.base_etag is None:
                    etag = self.storage.write_bytes(uri, data, if_none_match=True)
                else:
                    etag = self.storage.write_bytes(uri, data, if_match=self.base_etag)
            except StorageError as exc:
                if exc.reason is not Reason.ConcurrentWrite:
                    raise
                state = self._state()  # who wrote it? (maybe us: a retry)
                continue
            self._confirm(set_id, [*rels, MANIFEST, MARKER], uri, state, etag)
            LOG.info("committed set %s", set_id, extra={"fields": {"prefix": self.prefix}})
            return dropped
        raise StorageError(
            f"{self.field_name} {self.prefix}: the manifest kept changing while committing",
            reason=Reason.ConcurrentWrite,
        )

    def _verify(self, set_id: str, rels: list[str]) -> None:
        folder = join(self.prefix, set_dir(set_id, self.home))
        present = {o.key for o in self.storage.list(folder)}
        missing = sorted(set(rels) - present)
        if missing:
            raise StorageError(
                f"set {folder} lost {missing[:3]} before its commit (removed by another run "
                "of this job?)",
                reason=Reason.ConcurrentWrite,
            )

    def _confirm(
        self, set_id: str, rels: list[str], uri: str, before: PrefixState, etag: str
    ) -> None:
        """Check, right after the commit, that the set is still whole; else put back at
        ``uri`` the manifest ``before`` held (removed when there was none), if nobody
        replaced ours since, and raise ConcurrentWrite. Reclaiming never removes a set
        without a fence (:func:`~kquant_job.sets.state.fence`), but a file of the set can
        still be removed by hand between the check before the commit and the commit."""
        try:
            self._verify(set_id, rels)
        except StorageError:
            try:
                if before.manifest is None:
                    self.storage.delete(uri, if_match=etag)
                else:
                    self.storage.write_bytes(uri, dumps(before.manifest.data), if_match=etag)
            except StorageError as exc:
                LOG.warning("could not take back the manifest of set %s: %s", set_id, exc)
            raise

    def _withdraw(self, set_id: str) -> None:
        """Remove this run's uncommitted set folder after a failed commit (best effort: a
        rerun reclaims what is left)."""
        try:
            state = self._state()
            if state.manifest is None or state.manifest.set_id != set_id:
                delete_set(state, set_id)
        except StorageError as exc:
            LOG.warning("could not withdraw set %s: %s", set_id, exc)

    def _drop(self, dropped: list[str]) -> None:
        """Delete the sets this commit pushed out of the history (committed ones: never
        another writer's set in progress), after the fixed names stopped using them."""
        if not dropped:
            return
        state = self._state()
        kept = {h.set_id for h in state.manifest.history} if state.manifest else set()
        for set_id in dropped:
            if set_id not in kept and set_id in state.sets:
                delete_set(state, set_id)

    def _entry(self, set_id: str, rel: str, art: Artifact) -> dict[str, Any]:
        path = set_dir(set_id, self.home) + rel
        return {"name": rel, "path": path, "sha256": art.sha256, "bytes": art.bytes}

    def publish_failure(self, report: dict[str, Any]) -> str:
        """Write ``report`` for a failed run into a set folder of its own (marker state
        ``failed``), touching nothing else: the prefix's manifest and copies stay as they
        were. Returns the report's URI. Raises the storage's errors."""
        set_id = new_set_id()
        folder = join(self.prefix, set_dir(set_id, self.home))
        marker = build_marker(set_id, self.writer, "failed", now())
        write_marker(self.storage, join(folder, MARKER), dumps(marker), if_none_match=True)
        uri = join(folder, REPORT)
        self.storage.write_bytes(uri, dumps(report), metadata={SET_KEY: set_id})
        return uri


def _history(
    current: Manifest | None,
    set_id: str,
    writer: Writer,
    files: dict[str, str],
    retention: Retention,
    keep_all: bool = False,
) -> tuple[list[HistoryEntry], list[str]]:
    """The new manifest's history and lineage (:func:`~kquant_job.sets.layout.lineage`):
    this set, then the retained ones it replaces (all of them with ``keep_all``: fixed names
    may still hold any of their files), those of the current lineage first (the sets a
    rollback restores in turn; a set rolled back from goes first when the limit bites)."""
    before = lineage(current) if current else []
    entries = {h.set_id: h for h in (current.history if current else ()) if h.set_id != set_id}
    order = [*(s for s in before if s in entries), *(s for s in entries if s not in before)]
    kept = order if keep_all else order[: retention.keep_sets - 1]
    history = [HistoryEntry(set_id, writer, files), *(entries[s] for s in kept)]
    return history, [set_id, *(s for s in before if s in kept)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_files(files: list[str], staged_dir: Path, prefix: str) -> list[str]:
    """The artifact paths, checked: plain relative keys, no duplicates or file/directory
    clashes, none of kquant's own names, each present in ``staged_dir``."""
    rels = list(files)
    for rel in rels:
        if rel.endswith("/"):
            raise StorageError(f"artifact path {rel!r} names a directory", reason=Reason.UnsafePath)
    check_keys(rels, prefix)
    for rel in rels:
        if rel in (REPORT, MANIFEST) or rel.startswith(".kquant/") or rel == ".kquant":
            raise StorageError(
                f"artifact path {rel!r} is reserved for kquant's own {rel} under {prefix}",
                reason=Reason.UnsafePath,
            )
        if not (staged_dir / rel).is_file():
            raise StorageError(
                f"staged artifact {rel!r} is missing from {staged_dir}",
                reason=Reason.SourceNotFound,
            )
    return rels
