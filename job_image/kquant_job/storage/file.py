"""Local file system storage for ``file://`` URIs and plain paths.

``file:///abs/path`` is absolute; ``file://rel/path`` and a plain ``rel/path`` are relative to
the current directory. A trailing '/' makes a URI a prefix (a directory). Writes are atomic:
the bytes go to a hidden temporary file in the destination directory, are fsynced, then
renamed into place, so no half-written file is ever visible under its final name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kquant_api import Artifact, Reason
from kquant_job.errors import StorageError
from kquant_job.storage.base import CHUNK, ObjectInfo, Storage, is_prefix, join
from kquant_job.storage.paths import (
    atomic_target,
    check_keys,
    check_size,
    local_target,
    os_error,
)

SCHEME = "file://"


def to_path(uri: str) -> Path:
    """The local path a ``file://`` URI or plain path names (relative ones stay relative)."""
    if uri.startswith(SCHEME):
        uri = uri[len(SCHEME) :]
    return Path(uri or ".")


class FileStorage(Storage):
    """:class:`Storage` over the local file system. Errors are StorageError with reason
    SourceNotFound (missing path), AccessDenied (permissions, read-only file system),
    UnsafePath (a prefix whose symlinks point outside it, or that holds special files) or
    StorageUnavailable (other I/O errors, e.g. a full disk)."""

    def stat(self, uri: str) -> ObjectInfo | None:
        """Size in bytes of the regular file at ``uri``; None if absent or not a file."""
        path = to_path(uri)
        try:
            if not path.is_file():
                return None
            return ObjectInfo(key=path.name, size=path.stat().st_size)
        except OSError as exc:
            raise os_error(exc, uri, "stat") from None

    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every file below the directory ``prefix_uri`` (symlinks inside the tree followed),
        keys '/'-separated and relative to it, sorted; empty when the directory is absent.
        Raises StorageError(UnsafePath) for a symlink leaving the tree (see download)."""
        root = to_path(prefix_uri)
        if not root.is_dir():
            return []
        try:
            return [ObjectInfo(key, path.stat().st_size) for key, path in _walk(root, prefix_uri)]
        except OSError as exc:
            raise os_error(exc, prefix_uri, "list") from None

    def download(self, uri: str, dest_dir: Path, max_bytes: int | None = None) -> Path:
        """Copy a file to ``dest_dir/<name>``, or a directory (``uri`` ending in '/') into
        ``dest_dir`` mirroring its tree; returns the file or ``dest_dir``.

        Every entry is checked before anything is written: a symlink pointing outside the
        source tree, a dangling symlink, a symlink loop or a special file (FIFO, device)
        raises StorageError(UnsafePath) and is never followed. A missing or empty source
        raises StorageError(SourceNotFound); more than ``max_bytes`` in all,
        StorageError(SourceTooLarge) before anything is copied.
        """
        src = to_path(uri)
        if not is_prefix(uri):
            if src.is_dir():
                raise StorageError(
                    f"{uri} is a directory; end the URI with '/' to fetch it as a prefix",
                    reason=Reason.SourceNotFound,
                )
            check_size(uri, _size(src, uri), max_bytes)
            target = dest_dir / src.name
            _copy(src, target, uri, "download")
            return target
        if not src.is_dir():
            raise StorageError(f"no directory at {uri}", reason=Reason.SourceNotFound)
        try:
            pairs = _walk(src, uri)
        except OSError as exc:
            raise os_error(exc, uri, "list") from None
        if not pairs:
            raise StorageError(f"no files under {uri}", reason=Reason.SourceNotFound)
        check_keys([key for key, _ in pairs], uri)
        check_size(uri, sum(_size(path, uri) for _, path in pairs), max_bytes)
        plan = [(path, local_target(dest_dir, key, uri)) for key, path in pairs]
        for path, target in plan:
            _copy(path, target, uri, "download")
        return dest_dir

    def upload(self, src: Path, uri: str) -> Artifact:
        """Copy ``src`` to ``uri`` atomically (parents created), hashing while copying. A
        prefix ``uri`` receives ``src``'s name. Returns URI, hex SHA-256 and size in bytes."""
        if is_prefix(uri):
            uri = join(uri, src.name)
        digest, size = _copy(src, to_path(uri), uri, "upload to", hashed=True)
        return Artifact(uri=uri, sha256=digest, bytes=size)

    def delete(self, uri: str) -> None:
        """Remove the file at ``uri``; absent paths and directories are left alone."""
        path = to_path(uri)
        try:
            if path.is_dir() and not path.is_symlink():
                return
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise os_error(exc, uri, "delete") from None


def _size(path: Path, uri: str) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise os_error(exc, uri, "stat") from None


def _copy(
    src: Path, target: Path, uri: str, action: str, *, hashed: bool = False
) -> tuple[str, int]:
    """Copy ``src`` to ``target`` through a temporary file; returns (hex sha256 or '', bytes)."""
    digest = hashlib.sha256() if hashed else None
    size = 0
    try:
        with src.open("rb") as fin, atomic_target(target) as tmp, tmp.open("wb") as fout:
            while block := fin.read(CHUNK):
                if digest is not None:
                    digest.update(block)
                fout.write(block)
                size += len(block)
    except OSError as exc:
        raise os_error(exc, uri, action) from None
    return (digest.hexdigest() if digest else ""), size


def _walk(root: Path, where: str) -> list[tuple[str, Path]]:
    """(key, real file path) for every file below ``root``, sorted by key. Symlinks are
    resolved and must stay inside ``root``; each directory is entered once."""
    real_root = root.resolve()
    found: list[tuple[str, Path]] = []
    visited = {real_root}
    stack = [(real_root, "")]
    while stack:
        directory, rel = stack.pop()
        with os.scandir(directory) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            key = rel + name
            path = directory / name
            if path.is_symlink():
                try:
                    path = path.resolve()
                except (RuntimeError, OSError):  # 3.11 raises RuntimeError on a loop
                    raise _refuse(where, key, "symlink loop") from None
                if not path.is_relative_to(real_root):
                    raise _refuse(where, key, "symlink pointing outside the source tree")
                if not path.exists():
                    raise _refuse(where, key, "dangling symlink")
            if path.is_dir():
                if path in visited:
                    raise _refuse(where, key, "directory reached twice (symlink loop or alias)")
                visited.add(path)
                stack.append((path, key + "/"))
            elif path.is_file():
                found.append((key, path))
            else:
                raise _refuse(where, key, "not a regular file")
    return sorted(found)


def _refuse(where: str, key: str, why: str) -> StorageError:
    return StorageError(f"refusing {key!r} under {where}: {why}", reason=Reason.UnsafePath)
