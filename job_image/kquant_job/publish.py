"""Publishing a staged set of artifacts to an output prefix, manifest last.

Order (DESIGN.md, "Publishing"): when replacing a set, the old ``manifest.json`` is deleted
first, so no reader sees an old manifest beside new files; then every artifact is uploaded
with its sha256, then ``report.json``, then ``manifest.json``, which lists the artifacts and
the report with their sha256 and sizes. A reader that sees a manifest therefore sees a
complete set. Objects left over from the previous set are deleted after the new manifest is
up. Promotion is the same operation with overwrite semantics, from the same local staged set,
so it works across schemes (file:// to s3:// and back).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kquant_api import Artifact, Reason
from kquant_job.errors import StorageError
from kquant_job.storage.base import ObjectInfo, Storage, join
from kquant_job.storage.paths import check_keys

LOG = logging.getLogger("kquant.publish")
MANIFEST = "manifest.json"
REPORT = "report.json"


@dataclass(frozen=True)
class PublishedSet:
    """Where a set went: the artifacts (URI, sha256, bytes) and the report and manifest URIs."""

    artifacts: list[Artifact]
    report_uri: str
    manifest_uri: str


def as_prefix(uri: str) -> str:
    """``uri`` with exactly one trailing '/'."""
    return uri.rstrip("/") + "/"


def check_output_free(storage: Storage, prefix_uri: str, overwrite: bool) -> None:
    """Raise StorageError(OutputExists) when anything is stored under ``prefix_uri`` and
    ``overwrite`` is false (checked before fetching the model, to fail fast). Storage
    errors of the listing (e.g. a missing bucket: SourceNotFound) pass through."""
    if not overwrite:
        _refuse_existing(storage.list(as_prefix(prefix_uri)), as_prefix(prefix_uri))


def _refuse_existing(existing: list[ObjectInfo], prefix: str) -> None:
    if existing:
        raise StorageError(
            f"output {prefix} already holds {len(existing)} object(s) "
            f"(e.g. {existing[0].key}); set spec.output.overwrite: true to replace them",
            reason=Reason.OutputExists,
        )


def publish(
    storage: Storage,
    prefix_uri: str,
    staged_dir: Path,
    files: list[str],
    report: dict[str, Any],
    manifest: dict[str, Any],
    *,
    overwrite: bool,
) -> PublishedSet:
    """Publish ``files`` (paths relative to ``staged_dir``, '/'-separated) under
    ``prefix_uri`` with ``report.json`` and, last, ``manifest.json``.

    The manifest is ``manifest`` plus ``artifacts: [{path, sha256, bytes}]`` (in the order of
    ``files``) and ``report: {path, sha256, bytes}``; both JSON files are written with sorted
    keys and 2-space indent. Raises StorageError(OutputExists) when the prefix holds objects
    and ``overwrite`` is false, StorageError(UnsafePath) for a path that is not a plain
    relative path, repeats another, or is ``report.json`` / ``manifest.json``,
    StorageError(SourceNotFound) for a file missing from ``staged_dir``, and the storage's
    own errors.
    """
    prefix = as_prefix(prefix_uri)
    rels = _check_files(files, staged_dir, prefix)
    existing = storage.list(prefix)
    if not overwrite:
        _refuse_existing(existing, prefix)
    old = {obj.key for obj in existing}
    if MANIFEST in old:
        storage.delete(join(prefix, MANIFEST))
    artifacts = [storage.upload(staged_dir / rel, join(prefix, rel)) for rel in rels]
    entries = [
        {"path": r, "sha256": a.sha256, "bytes": a.bytes}
        for r, a in zip(rels, artifacts, strict=True)
    ]
    with tempfile.TemporaryDirectory(prefix="kquant-publish-") as tmp:
        report_art = storage.upload(_write_json(Path(tmp) / REPORT, report), join(prefix, REPORT))
        full = {
            **manifest,
            "artifacts": entries,
            "report": {"path": REPORT, "sha256": report_art.sha256, "bytes": report_art.bytes},
        }
        manifest_art = storage.upload(
            _write_json(Path(tmp) / MANIFEST, full), join(prefix, MANIFEST)
        )
    stale = sorted(old - set(rels) - {REPORT, MANIFEST})
    for key in stale:
        storage.delete(join(prefix, key))
    LOG.info(
        "published %d artifact(s) to %s",
        len(artifacts),
        prefix,
        extra={"fields": {"uri": prefix, "artifacts": len(artifacts), "stale_removed": len(stale)}},
    )
    return PublishedSet(
        artifacts=artifacts, report_uri=report_art.uri, manifest_uri=manifest_art.uri
    )


def promote(
    storage: Storage,
    prefix_uri: str,
    staged_dir: Path,
    files: list[str],
    report: dict[str, Any],
    manifest: dict[str, Any],
) -> PublishedSet:
    """Copy a validated set (the local staged files) to the promotion prefix: :func:`publish`
    with overwrite, so the old manifest goes first, the new one last, stale objects after."""
    return publish(storage, prefix_uri, staged_dir, files, report, manifest, overwrite=True)


def publish_report_only(storage: Storage, prefix_uri: str, report: dict[str, Any]) -> str:
    """For a failed validation: delete ``manifest.json`` under ``prefix_uri`` if present (so
    no earlier set stays advertised), write only ``report.json``, and return its URI.
    Raises the storage's StorageErrors."""
    prefix = as_prefix(prefix_uri)
    manifest_uri = join(prefix, MANIFEST)
    if storage.stat(manifest_uri) is not None:
        storage.delete(manifest_uri)
    with tempfile.TemporaryDirectory(prefix="kquant-publish-") as tmp:
        return storage.upload(_write_json(Path(tmp) / REPORT, report), join(prefix, REPORT)).uri


def dumps(data: dict[str, Any]) -> str:
    """JSON as published: sorted keys, 2-space indent, trailing newline; values JSON cannot
    hold (paths, enums of other types) are written as strings."""
    return json.dumps(data, sort_keys=True, indent=2, default=str) + "\n"


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(dumps(data), encoding="utf-8")
    return path


def _check_files(files: list[str], staged_dir: Path, prefix: str) -> list[str]:
    rels = list(files)
    for rel in rels:
        if rel.endswith("/"):
            raise StorageError(f"artifact path {rel!r} names a directory", reason=Reason.UnsafePath)
    check_keys(rels, prefix)  # plain relative keys, no duplicates, no file/dir clash
    for rel in rels:
        if rel in (REPORT, MANIFEST):
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
