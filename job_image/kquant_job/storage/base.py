"""The storage interface: one small class per URI scheme (s3, file).

Object URIs name one object (``s3://bucket/key``, ``file:///dir/model.onnx``); prefix URIs end
with ``/`` and name a directory (``s3://bucket/models/sensevoice/``). Keys below a prefix are
returned relative to it, '/'-separated.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kquant_api import Artifact

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: ``key`` relative to the listed prefix, ``size`` in bytes, its
    version token ``etag`` (S3's ETag; for a local file device, inode, mtime and size, so a
    replaced file gets a new one and a hard link shares it) and user ``metadata`` (S3's
    ``x-amz-meta-*`` from :meth:`Storage.stat`; empty in listings and for local files).
    ``linked``: a local file with other names (hard links) besides this one; ``symlink``:
    a local name that is a symlink to the file (never one kquant makes)."""

    key: str
    size: int
    etag: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False)
    linked: bool = field(default=False, compare=False)
    symlink: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Upload:
    """An unfinished write under a prefix: an S3 multipart upload, or a local temporary
    file that a killed writer left. ``key`` is relative to the listed prefix; ``initiated``
    in seconds since the epoch (None when the store does not say); ``writer_alive``: whether
    the writing process still runs, when the store can tell (local files of this host)."""

    key: str
    upload_id: str
    initiated: float | None = None
    writer_alive: bool | None = None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read into one reused 8 MiB buffer (memory stays flat for any
    size; no allocation per block). Raises OSError when the file cannot be read."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def is_prefix(uri: str) -> bool:
    """True when the URI names a directory/prefix (ends with '/')."""
    return uri.endswith("/")


def join(prefix_uri: str, rel: str) -> str:
    """``prefix_uri`` + relative key, with exactly one '/' between them."""
    return prefix_uri.rstrip("/") + "/" + rel.lstrip("/")


class Storage(ABC):
    """Read and write objects under one scheme. Every method raises
    :class:`~kquant_job.errors.StorageError` with a classified reason (SourceNotFound,
    AccessDenied, UnsafePath, ConcurrentWrite, StorageRejected, StorageUnavailable) and a
    message naming the URI.

    ``content_etags``: whether equal etags mean equal bytes (S3: an MD5 of the content or of
    its parts). A local file's etag names the file (inode, mtime, size) instead: two names
    of one inode share it, whatever was written into that inode since."""

    content_etags: bool = True

    @abstractmethod
    def stat(self, uri: str) -> ObjectInfo | None:
        """Size of the object at ``uri``, or None when it does not exist."""

    def occupied(self, uri: str) -> bool:
        """Whether something that is no object (a local folder, link or FIFO) holds the
        name ``uri``, so no object can be written there. False for object stores."""
        return False

    @abstractmethod
    def list(self, prefix_uri: str, limit: int | None = None) -> list[ObjectInfo]:
        """Every object below ``prefix_uri`` (recursive), keys relative to it, sorted; with
        ``limit``, only the first ``limit`` keys in key order."""

    @abstractmethod
    def download(
        self,
        uri: str,
        dest_dir: Path,
        max_bytes: int | None = None,
        skip: Callable[[str], bool] | None = None,
    ) -> Path:
        """Fetch an object (into ``dest_dir/<basename>``) or a prefix (into ``dest_dir``,
        mirroring the keys) and return the local file or directory.

        Raises StorageError(SourceNotFound) when nothing is there, StorageError(UnsafePath)
        when a key would land outside ``dest_dir`` (``..``, absolute keys) or two keys
        collide, StorageError(SourceTooLarge) when the object or the prefix's objects add up
        to more than ``max_bytes``. Nothing is written outside ``dest_dir``, and nothing at
        all before these checks pass. ``skip`` (a prefix only) leaves out the keys (relative
        to the prefix) for which it returns True: they are neither checked nor fetched.
        """

    def read_in_place(self, uri: str) -> Path | None:
        """The local path a job may read ``uri`` at instead of a downloaded copy, after the
        checks :meth:`download` makes (raising what it raises, but SourceTooLarge: nothing
        is copied), or None when the store has no local path (S3)."""
        return None

    @abstractmethod
    def upload(self, src: Path, uri: str, metadata: Mapping[str, str] | None = None) -> Artifact:
        """Store the local file ``src`` at object ``uri`` with ``metadata`` (plus ``sha256``,
        where the store keeps metadata); the object appears whole or not at all. Returns its
        URI, hex SHA-256 and size in bytes."""

    @abstractmethod
    def delete(self, uri: str, if_match: str | None = None) -> None:
        """Remove one object; absent objects are not an error. With ``if_match`` (an etag),
        only while the object still has that etag: raises StorageError(ConcurrentWrite) when
        it was replaced since, so another writer's object is never removed."""

    @abstractmethod
    def read_bytes(self, uri: str, max_bytes: int) -> tuple[bytes, str] | None:
        """A small object's bytes and etag, or None when it does not exist. Raises
        StorageError(SourceTooLarge) beyond ``max_bytes``."""

    @abstractmethod
    def write_bytes(
        self,
        uri: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Store ``data`` at ``uri`` in one atomic step and return the new etag. With
        ``if_none_match``, only if no object exists there; with ``if_match``, only while the
        object has that etag (S3 conditional writes; exclusive create and a directory lock
        locally). A failed condition raises StorageError(ConcurrentWrite): exactly one of
        several concurrent conditional writers succeeds."""

    @abstractmethod
    def copy(
        self,
        src_uri: str,
        dst_uri: str,
        metadata: Mapping[str, str],
        *,
        absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        """Replace ``dst_uri`` with a copy of the object ``src_uri`` in one atomic step (S3:
        a server-side copy carrying ``metadata``; locally: a copy sharing no data with the
        source, renamed into place). Readers of ``dst_uri`` see the old or the new object,
        whole, never neither. ``absent``: only if nothing is at ``dst_uri``; ``if_match``:
        only while the object there has that etag; else StorageError(ConcurrentWrite): a
        name someone wrote since it was looked at is never replaced."""

    def content_sha256(self, uri: str, info: ObjectInfo) -> str | None:
        """Hex SHA-256 of the object at ``uri`` (``info`` from :meth:`stat`) when the store can
        tell it without a download: the ``sha256`` metadata kquant writes with every object.
        None when unknown."""
        return info.metadata.get("sha256")

    def within(self, prefix_uri: str, key: str) -> bool:
        """Whether ``key`` (relative to ``prefix_uri``) names a place inside the prefix: no
        folder on the way is a link leading elsewhere. A store without links (S3): always."""
        return True

    def prune(self, prefix_uri: str) -> None:
        """Remove the empty folders at and below ``prefix_uri`` (a folder kquant emptied).
        A store without folders (S3) has nothing to do."""
        return None

    @abstractmethod
    def list_uploads(self, prefix_uri: str) -> list[Upload]:
        """Unfinished writes below ``prefix_uri`` (keys relative to it)."""

    @abstractmethod
    def abort_upload(self, prefix_uri: str, upload: Upload) -> None:
        """Discard one unfinished write found by :meth:`list_uploads`; gone is not an
        error."""
