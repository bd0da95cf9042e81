"""The layout of a prefix kquant publishes to, and its manifest.

::

    <prefix>/manifest.json                     the pointer: the current set, written last,
                                               in one conditional write
    <prefix>/.kquant/sets/<set id>/set.json    the set's marker: who wrote it (written first)
    <prefix>/.kquant/sets/<set id>/<files>     the set's artifacts and report.json, immutable
    <prefix>/.kquant/sets/<set id>/manifest.json   the set's own manifest (for rollback)
    <prefix>/<files>                           fixed-name copies of the current set's files

A reader that follows ``manifest.json`` reads ``artifacts[].path``: objects inside an
immutable set folder, so it never sees a mixed set, and the last few sets stay (``history``)
for readers still downloading an older one and for rollback. The fixed-name copies exist for
readers that open a known file name; each is whole (one atomic write) and kept in step with
the manifest (:mod:`kquant_job.sets.mirrors`).

Everything here is a pure function of bytes and dicts: no storage access.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kquant_api import API_VERSION, QuantizationJob, Reason
from kquant_job.errors import InvalidSpec, StorageError
from kquant_job.storage.paths import check_key

MANIFEST = "manifest.json"
REPORT = "report.json"
MARKER = "set.json"
SETS = ".kquant/sets/"
KQUANT_DIR = ".kquant/"
MANIFEST_KIND = "ModelManifest"
MARKER_KIND = "QuantizationSet"
LAYOUT = 2
MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a manifest is JSON text; beyond this it is not ours
SET_KEY = "kquant-set"  # object metadata naming the set an object belongs to (S3)
KEEP_SETS_ENV, ABANDONED_ENV = "KQUANT_KEEP_SETS", "KQUANT_ABANDONED_SET_SECONDS"
LIVE_ENV = "KQUANT_LIVE_SET_SECONDS"


@dataclass(frozen=True)
class Retention:
    """How many committed sets a prefix keeps (the current one included; ``KQUANT_KEEP_SETS``,
    default 3, at least 2); after how many seconds an unfinished set of another job counts as
    abandoned and is removed (``KQUANT_ABANDONED_SET_SECONDS``, default 86400: longer than any
    sane Job deadline, so a live writer is never mistaken for a dead one); and ``live_seconds``
    (``KQUANT_LIVE_SET_SECONDS``, default 1800), the lease of a run on its set folder: a
    run renews it every third of that time while it writes the set
    (:mod:`kquant_job.sets.lease`) and commits only within that time of its last renewal,
    and another run of the same job removes an uncommitted set only once its marker was
    last renewed twice that long ago (the margin absorbs clocks that disagree by up to
    ``live_seconds``). Two runs of one job may
    be alive at once (a CLI run twice, a pod replaced while its node is cut off): a set is
    never removed while its writer may still commit it."""

    keep_sets: int = 3
    abandoned_seconds: float = 86400.0
    live_seconds: float = 1800.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Retention:
        """Read the three variables; raises InvalidSpec naming one that is not a positive
        number (``KQUANT_KEEP_SETS``: an integer >= 2)."""
        env = os.environ if env is None else env
        d = cls()
        keep = int(_positive(env, KEEP_SETS_ENV, d.keep_sets, integer=True))
        if keep < 2:
            # the set being replaced stays while its copies are replaced and its readers
            # finish: with 1 the copies of the replaced set were no longer recognised as
            # kquant's, so they stayed (readers got the old model) and the next run failed
            # ForeignObject (fault-injection trial)
            raise InvalidSpec(
                f"{KEEP_SETS_ENV}={keep}: kquant keeps at least 2 sets, the current one and "
                "the one it replaced (its fixed-name copies and readers still use it)"
            )
        return cls(
            keep_sets=keep,
            abandoned_seconds=_positive(env, ABANDONED_ENV, d.abandoned_seconds),
            live_seconds=_positive(env, LIVE_ENV, d.live_seconds),
        )


def _positive(env: Mapping[str, str], name: str, default: float, integer: bool = False) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = 0
    if not value > 0:
        kind = "integer" if integer else "number"
        raise InvalidSpec(f"{name}={raw!r}: expected a positive {kind}")
    return value


@dataclass(frozen=True)
class Writer:
    """Who writes a set: the QuantizationJob (namespace, name, uid, generation) and this
    run's random id (a rerun of the same generation has another). A run outside a cluster
    has no uid or generation: ``spec`` (a digest of its spec) stands for the generation, so
    another spec under the same name (every unnamed spec is ``quantizationjob``) is another
    generation, never a rerun that may replace the set."""

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    run_id: str = field(default_factory=lambda: secrets.token_hex(8))
    spec: str | None = None

    @classmethod
    def of(cls, job: QuantizationJob) -> Writer:
        """The writer for a run of ``job``."""
        meta = job.metadata
        digest = None
        if meta.uid is None and meta.generation is None:
            text = json.dumps(job.spec.model_dump(mode="json"), sort_keys=True)
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        return cls(meta.name, meta.namespace, meta.uid, meta.generation, spec=digest)

    @classmethod
    def from_ref(cls, ref: Mapping[str, Any]) -> Writer:
        """Parse the ``job`` object of a manifest or marker (unknown fields ignored)."""
        generation = ref.get("generation")
        return cls(
            name=str(ref.get("name", "")),
            namespace=ref.get("namespace"),
            uid=ref.get("uid"),
            generation=generation if isinstance(generation, int) else None,
            run_id=str(ref.get("runId", "")),
            spec=ref.get("specDigest") if isinstance(ref.get("specDigest"), str) else None,
        )

    def ref(self) -> dict[str, Any]:
        """The ``job`` object written into manifests and markers."""
        ref = {
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "generation": self.generation,
            "runId": self.run_id,
            "specDigest": self.spec,
        }
        return {k: v for k, v in ref.items() if v is not None}

    def same_job(self, other: Writer) -> bool:
        """The same QuantizationJob: equal uids when both have one (a deleted and re-created
        job is another), else equal namespace and name (local runs have no uid)."""
        if self.uid and other.uid:
            return self.uid == other.uid
        return (self.namespace, self.name) == (other.namespace, other.name)

    def same_generation(self, other: Writer) -> bool:
        """The same job at the same generation: a rerun (or retry) of this one (outside a
        cluster: of the same spec, when both say theirs)."""
        if not (self.same_job(other) and self.generation == other.generation):
            return False
        return self.spec is None or other.spec is None or self.spec == other.spec

    def newer_than(self, other: Writer) -> bool:
        """The same job at a strictly later generation."""
        return (
            self.same_job(other)
            and self.generation is not None
            and other.generation is not None
            and self.generation > other.generation
        )

    def describe(self) -> str:
        """``namespace/name`` (generation g, run r) for messages."""
        who = f"{self.namespace}/{self.name}" if self.namespace else self.name
        # a CLI run outside a cluster has no generation: not "generation None"
        gen = f"generation {self.generation}, " if self.generation is not None else ""
        return f"{who} ({gen}run {self.run_id or '?'})"


def new_set_id(now: datetime | None = None) -> str:
    """A fresh set id: UTC time (sorts by age) and 8 random hex digits."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def manifest_key(home: str = "") -> str:
    """The manifest's key, relative to the prefix: ``manifest.json``, or inside ``home``
    (``.kquant/beside-fp16/manifest.json``: a prefix shared with other people's files keeps
    kquant's bookkeeping in its own folder)."""
    return f"{home}{MANIFEST}"


def sets_key(home: str = "") -> str:
    """The folder of set folders, relative to the prefix: ``.kquant/sets/``, or
    ``<home>sets/``."""
    return f"{home}sets/" if home else SETS


def set_dir(set_id: str, home: str = "") -> str:
    """The set folder, relative to the prefix (ends in '/')."""
    return f"{sets_key(home)}{set_id}/"


def set_id_of(key: str, home: str = "") -> str | None:
    """The set id of a key below the sets folder (relative to the prefix), else None."""
    sets = sets_key(home)
    if not key.startswith(sets):
        return None
    head = key[len(sets) :].split("/", 1)[0]
    return head or None


def dumps(data: Mapping[str, Any]) -> bytes:
    """JSON as published: sorted keys, 2-space indent, trailing newline; values JSON cannot
    hold (paths, enums) written as strings."""
    return (json.dumps(data, sort_keys=True, indent=2, default=str) + "\n").encode("utf-8")


@dataclass(frozen=True)
class HistoryEntry:
    """One committed set in a manifest's ``history``: its id ('' for a set of kquant's first
    layout, which had no folder), its writer and its fixed names with their sha256."""

    set_id: str
    writer: Writer
    files: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        """The ``history`` item."""
        return {"set": self.set_id, "job": self.writer.ref(), "files": dict(self.files)}


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json`` of ours: the current set (None for a manifest of kquant's
    first layout, whose files sat at fixed names only), its writer, the fixed names of its
    files with their sha256 (``files``), and the retained sets, newest first (``history``,
    the current one included; a first-layout manifest gets one entry with set id '')."""

    set_id: str | None
    writer: Writer
    files: dict[str, str]
    history: tuple[HistoryEntry, ...]
    data: dict[str, Any]

    def naming(self, name: str) -> list[HistoryEntry]:
        """The retained sets that placed a file at the fixed name ``name``."""
        return [entry for entry in self.history if name in entry.files]

    def owned_names(self) -> set[str]:
        """Every fixed name a retained set of kquant may have placed at the prefix."""
        return {name for entry in self.history for name in entry.files}

    def fence(self, writer: Writer) -> Writer:
        """The writer a run of ``writer``'s job must be newer than to replace this manifest:
        of the current set and the retained ones of that job, the latest generation. After a
        rollback the current set is an older generation's; a stale run of a generation
        between it and the newest retained one replaced it (trial)."""
        newest = self.writer
        for entry in self.history:
            if entry.writer.same_job(writer) and entry.writer.newer_than(newest):
                newest = entry.writer
        return newest


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Parse ``manifest.json`` bytes found at ``where``.

    Raises StorageError(ForeignObject) when it is not a kquant ModelManifest (another
    tool's manifest.json is never replaced)."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        doc = None
    if not (
        isinstance(doc, dict)
        and doc.get("kind") == MANIFEST_KIND
        and doc.get("apiVersion") == API_VERSION
        and isinstance(doc.get("artifacts"), list)
    ):
        raise StorageError(
            f"{where} is not a kquant manifest: kquant never replaces an object it did not "
            "write (choose another prefix, or remove it yourself)",
            reason=Reason.ForeignObject,
        )
    _check_names(doc, where)
    writer = Writer.from_ref(doc.get("job") or {})
    entries = [*doc["artifacts"], doc.get("report") or {}]
    set_id = doc.get("set") if isinstance(doc.get("set"), str) else None
    files = {}
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("path"), str):
            files[str(e.get("name") or e["path"])] = str(e.get("sha256", ""))
    history = []
    for item in doc.get("history") or []:
        if isinstance(item, dict) and isinstance(item.get("set"), str):
            named = item.get("files") if isinstance(item.get("files"), dict) else {}
            history.append(
                HistoryEntry(
                    item["set"],
                    Writer.from_ref(item.get("job") or {}),
                    {str(k): str(v) for k, v in named.items()},
                )
            )
    if set_id is None:  # kquant's first layout: the files themselves sat at fixed names
        history = [HistoryEntry("", writer, files)]
    return Manifest(set_id, writer, files, tuple(history), doc)


def _check_names(doc: dict[str, Any], where: str) -> None:
    """Raise StorageError(UnsafePath) unless every name a manifest gives (set ids; artifact,
    report and history file names and paths) is a plain relative key
    (:func:`~kquant_job.storage.paths.check_key`) and every set id one path segment: kquant
    deletes and copies by these names, and a planted manifest naming
    ``../../victim/important.txt`` with that file's sha256 had a promotion delete a file
    outside its prefix (hostile-input trial)."""
    sets = [doc.get("set")] + [
        h.get("set") for h in doc.get("history") or [] if isinstance(h, dict)
    ]
    names: list[Any] = []
    for e in [*doc["artifacts"], doc.get("report") or {}]:
        if isinstance(e, dict):
            names += [e[k] for k in ("name", "path") if k in e]
    for h in doc.get("history") or []:
        if isinstance(h, dict) and isinstance(h.get("files"), dict):
            names += list(h["files"])
    try:
        for set_id in sets:
            if isinstance(set_id, str) and set_id:  # '': the first layout's, kept in history
                check_key(set_id, where)
                if "/" in set_id:
                    raise StorageError(f"{where}: set id {set_id!r} is not one path segment",
                                       reason=Reason.UnsafePath)  # fmt: skip
        for name in names:
            check_key(str(name), where)
    except StorageError as exc:
        raise StorageError(
            f"{where} names a path kquant never writes, so kquant did not write it and will "
            f"neither follow nor replace it: {exc}",
            reason=Reason.UnsafePath,
        ) from None


def build_manifest(
    fields: Mapping[str, Any],
    set_id: str,
    writer: Writer,
    artifacts: list[dict[str, Any]],
    report: dict[str, Any],
    history: list[HistoryEntry],
    lineage: list[str] | None = None,
) -> dict[str, Any]:
    """The manifest of a set: ``fields`` (precision, source, validation...) plus the layout,
    the set id, the writer, the artifacts and the report (``{name, path, sha256, bytes}``,
    ``path`` inside the set folder, ``name`` the fixed name), the history and the
    ``lineage`` (:func:`lineage`)."""
    extra = {LINEAGE_KEY: list(lineage)} if lineage is not None else {}
    return {
        **extra,
        **fields,
        "apiVersion": API_VERSION,
        "kind": MANIFEST_KIND,
        "layout": LAYOUT,
        "set": set_id,
        "job": writer.ref(),
        "artifacts": artifacts,
        "report": report,
        "history": [h.to_json() for h in history],
    }


# The sets that were current in turn, the current first: a commit puts its set on top, a
# rollback takes the top off. A rollback without --to restores the second.
LINEAGE_KEY = "lineage"
# Before the lineage: a rolled-back manifest's sets committed after its own, newest first.
NEWER_KEY = "newerSets"


def lineage(manifest: Manifest) -> list[str]:
    """The retained sets that were current in turn, the current set first (``lineage`` of
    the manifest, kept sets only, once each). A set a rollback went back from is not in it,
    though its history entry stays (its copies may still sit at fixed names): rolled back
    from v3 to v2 to v1, then v4 published, the lineage is v4, v1 and a rollback restores v1,
    then finds nothing before it (a lineage read as commit order went forward to the v3
    rolled back from: trial). A manifest written before the lineage: its history in commit
    order (``newerSets`` first) from the current set down. Empty when the current set is
    not where the lineage or history puts it (a garbled manifest)."""
    ids = [h.set_id for h in manifest.history if h.set_id]
    raw = manifest.data.get(LINEAGE_KEY)
    if isinstance(raw, list):
        out: list[str] = []
        for set_id in raw:
            if isinstance(set_id, str) and set_id in ids and set_id not in out:
                out.append(set_id)
    else:
        newer = [s for s in manifest.data.get(NEWER_KEY) or [] if isinstance(s, str)]
        order = [s for s in newer if s in ids] + [s for s in ids if s not in newer]
        out = order[order.index(manifest.set_id) :] if manifest.set_id in order else []
    return out if out and out[0] == manifest.set_id else []


def build_marker(set_id: str, writer: Writer, state: str, started: str) -> dict[str, Any]:
    """A set's ``set.json``: kind, set id, writer, ``state`` (writing, committed-elsewhere
    states are not recorded; failed: a failure report only) and start time (RFC 3339)."""
    return {
        "apiVersion": API_VERSION,
        "kind": MARKER_KIND,
        "set": set_id,
        "job": writer.ref(),
        "state": state,
        "startedAt": started,
    }


def parse_time(text: Any) -> float | None:
    """Seconds since the epoch of an RFC 3339 UTC time (``2026-12-03T10:00:00Z``), or
    None."""
    if not isinstance(text, str):
        return None
    try:
        parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return parsed.replace(tzinfo=timezone.utc).timestamp()
