"""The storage interface: one small class per URI scheme (s3, file).

Object URIs name one object (``s3://bucket/key``, ``file:///dir/model.onnx``); prefix URIs end
with ``/`` and name a directory (``s3://bucket/models/sensevoice/``). Keys below a prefix are
returned relative to it, '/'-separated.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from kquant_api import Artifact

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: ``key`` relative to the listed prefix, ``size`` in bytes."""

    key: str
    size: int


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
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
    AccessDenied, UnsafePath, StorageUnavailable) and a message naming the URI."""

    @abstractmethod
    def stat(self, uri: str) -> ObjectInfo | None:
        """Size of the object at ``uri``, or None when it does not exist."""

    @abstractmethod
    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every object below ``prefix_uri`` (recursive), keys relative to it, sorted."""

    @abstractmethod
    def download(self, uri: str, dest_dir: Path, max_bytes: int | None = None) -> Path:
        """Fetch an object (into ``dest_dir/<basename>``) or a prefix (into ``dest_dir``,
        mirroring the keys) and return the local file or directory.

        Raises StorageError(SourceNotFound) when nothing is there, StorageError(UnsafePath)
        when a key would land outside ``dest_dir`` (``..``, absolute keys) or two keys
        collide, StorageError(SourceTooLarge) when the object or the prefix's objects add up
        to more than ``max_bytes``. Nothing is written outside ``dest_dir``, and nothing at
        all before these checks pass.
        """

    @abstractmethod
    def upload(self, src: Path, uri: str) -> Artifact:
        """Store the local file ``src`` at object ``uri``; the object appears whole or not at
        all. Returns its URI, hex SHA-256 and size in bytes."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove one object; absent objects are not an error."""
