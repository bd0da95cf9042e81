"""Local file system storage for ``file://`` URIs and plain paths.

``file:///abs/path`` is absolute; ``file://rel/path`` and a plain ``rel/path`` are relative to
the current directory. A trailing '/' makes a URI a prefix (a directory). Writes are atomic:
the bytes go to a hidden temporary file in the destination directory, are fsynced, then
renamed into place, so no half-written file is ever visible under its final name. Temporary
files (``*.kquant-part``) are never listed as objects; :meth:`FileStorage.list_uploads`
finds the ones a killed writer left.

Conditional writes: "create only if absent" is a hard link of the finished temporary file
(``link`` fails when the name exists; the temporary name is then removed, so no two names
share the file); "replace or delete only if unchanged" compares the etag and acts under an
exclusive ``flock`` of the directory, which every such step takes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from kquant_api import Artifact, Reason
from kquant_job.errors import StorageError
from kquant_job.storage.base import (
    CHUNK,
    ObjectInfo,
    Storage,
    Upload,
    is_prefix,
    join,
    sha256_file,
)
from kquant_job.storage.paths import (
    TEMP_SUFFIX,
    atomic_target,
    check_keys,
    check_size,
    dir_lock,
    fsync_dir,
    local_target,
    os_error,
    temp_path,
    temp_target,
    temp_writer_alive,
)

SCHEME = "file://"


def to_path(uri: str) -> Path:
    """The local path a ``file://`` URI or plain path names (relative ones stay relative)."""
    if uri.startswith(SCHEME):
        uri = uri[len(SCHEME) :]
    return Path(uri or ".")


def etag_of(st: os.stat_result) -> str:
    """A file's version token: device, inode, mtime (ns) and size. A replaced file gets a
    new inode, so a new token; hard links share theirs."""
    return f"{st.st_dev:x}.{st.st_ino:x}.{st.st_mtime_ns:x}.{st.st_size:x}"


def _conflict(uri: str, why: str) -> StorageError:
    return StorageError(f"{uri}: {why}", reason=Reason.ConcurrentWrite)


# ioctl(2) FICLONE (linux/fs.h): the destination shares the source's extents copy-on-write.
FICLONE = 0x40049409


def clone(src: Path, dst: Path) -> None:
    """Write a new file ``dst`` with ``src``'s bytes, synced, sharing nothing an in-place
    write to either could change: a reflink where the file system has them (Btrfs, XFS:
    copy-on-write, no bytes copied), else a byte copy. Never a hard link: a fixed-name copy
    linked to its set's file let a colleague's ``cp`` over the fixed name rewrite the set's
    immutable file too, and kquant then took the colleague's file for its own (trial)."""
    import fcntl

    with src.open("rb") as fin, dst.open("xb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        except OSError:
            shutil.copyfileobj(fin, fout, CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


class FileStorage(Storage):
    """:class:`Storage` over the local file system. Errors are StorageError with reason
    SourceNotFound (missing path), AccessDenied (permissions, read-only file system),
    UnsafePath (a prefix whose symlinks point outside it, or that holds special files) or
    StorageUnavailable (other I/O errors, e.g. a full disk)."""

    content_etags = False  # etag_of names the file, not its bytes

    def stat(self, uri: str) -> ObjectInfo | None:
        """Size in bytes and etag (:func:`etag_of`) of the regular file at ``uri``; None if
        absent or not a file."""
        path = to_path(uri)
        try:
            if not path.is_file():
                return None
            st = path.stat()
            return ObjectInfo(path.name, st.st_size, etag_of(st), linked=st.st_nlink > 1,
                              symlink=path.is_symlink())  # fmt: skip
        except OSError as exc:
            raise os_error(exc, uri, "stat") from None

    def occupied(self, uri: str) -> bool:
        """Whether a folder, symlink, FIFO or device (anything but a regular file) lies at
        ``uri``: publishing there would fail after the manifest switch."""
        path = to_path(uri)
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise os_error(exc, uri, "stat") from None
        return not stat.S_ISREG(mode)

    def list(self, prefix_uri: str, limit: int | None = None) -> list[ObjectInfo]:
        """Every file below the directory ``prefix_uri`` (symlinks inside the tree followed,
        temporary ``*.kquant-part`` files left out; the first ``limit`` keys when given), keys
        '/'-separated and relative to it, sorted, with etags; empty when the directory is
        absent. Raises StorageError(UnsafePath) for a symlink leaving the tree (see
        download)."""
        root = to_path(prefix_uri)
        if not root.is_dir():
            return []
        try:
            found = []
            for key, path in _walk(root, prefix_uri)[:limit]:
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue  # removed since the walk: not listed, as it is gone
                found.append(ObjectInfo(key, st.st_size, etag_of(st)))
            return found
        except OSError as exc:
            raise os_error(exc, prefix_uri, "list") from None

    def download(
        self,
        uri: str,
        dest_dir: Path,
        max_bytes: int | None = None,
        skip: Callable[[str], bool] | None = None,
    ) -> Path:
        """Copy a file to ``dest_dir/<name>``, or a directory (``uri`` ending in '/') into
        ``dest_dir`` mirroring its tree; returns the file or ``dest_dir``.

        Every entry is checked before anything is written: a symlink pointing outside the
        source tree, a dangling symlink, a symlink loop or a special file (FIFO, device)
        raises StorageError(UnsafePath) and is never followed. A missing or empty source
        raises StorageError(SourceNotFound); more than ``max_bytes`` in all,
        StorageError(SourceTooLarge) before anything is copied.
        """
        src, pairs = _checked_source(uri, skip)
        if pairs is None:
            size = _size(src, uri)
            check_size(uri, size, max_bytes)
            target = dest_dir / src.name
            _copy(src, target, uri, "download", limit=size)
            return target
        sizes = [_size(path, uri) for _, path in pairs]
        check_size(uri, sum(sizes), max_bytes)
        plan = [(path, local_target(dest_dir, key, uri)) for key, path in pairs]
        for (path, target), size in zip(plan, sizes, strict=True):
            _copy(path, target, uri, "download", checked=True, limit=size)
        return dest_dir

    def read_in_place(self, uri: str) -> Path | None:
        """The resolved file or directory at ``uri``, checked as :meth:`download` checks it
        (a directory's symlinks stay inside it; no special files; SourceNotFound when missing
        or empty), for the sandbox to read where it lies: no copy. The sandbox's child gets
        read-only access to that path alone (Landlock), so reading in place cannot change the
        user's files."""
        src, pairs = _checked_source(uri, None)
        if pairs is None:
            _size(src, uri)  # SourceNotFound when missing
            if not src.is_file():
                raise StorageError(f"{uri} is not a regular file", reason=Reason.UnsafePath)
        return src.resolve()

    def upload(self, src: Path, uri: str, metadata: Mapping[str, str] | None = None) -> Artifact:
        """Copy ``src`` to ``uri`` atomically (parents created), hashing while copying. A
        prefix ``uri`` receives ``src``'s name. ``metadata`` is not kept (a file has none).
        Returns URI, hex SHA-256 and size in bytes."""
        if is_prefix(uri):
            uri = join(uri, src.name)
        digest, size = _copy(src, to_path(uri), uri, "upload to", hashed=True)
        return Artifact(uri=uri, sha256=digest, bytes=size)

    def delete(self, uri: str, if_match: str | None = None) -> None:
        """Remove the file at ``uri``; absent paths and directories are left alone. With
        ``if_match``, under the directory lock and only while the file's etag is that one,
        else StorageError(ConcurrentWrite). Empty parent directories are left in place."""
        path = to_path(uri)
        try:
            if path.is_dir() and not path.is_symlink():
                return
            if if_match is None:
                path.unlink(missing_ok=True)
                return
            if not path.parent.is_dir():
                return
            with dir_lock(path.parent):
                try:
                    current = etag_of(path.lstat())
                except FileNotFoundError:
                    return
                if current != if_match:
                    raise _conflict(uri, "replaced by another writer; not deleted")
                path.unlink()
        except OSError as exc:
            raise os_error(exc, uri, "delete") from None

    def read_bytes(self, uri: str, max_bytes: int) -> tuple[bytes, str] | None:
        """The file's bytes and etag (both from one open file), or None when absent.
        Raises StorageError(SourceTooLarge) beyond ``max_bytes``."""
        path = to_path(uri)
        try:
            with path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                check_size(uri, st.st_size, max_bytes)
                return fh.read(max_bytes + 1), etag_of(st)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as exc:
            raise os_error(exc, uri, "read") from None

    def write_bytes(
        self,
        uri: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Write ``data`` to a synced temporary file, then: with ``if_none_match``, link it
        to ``uri`` (fails if the name exists); with ``if_match``, replace ``uri`` under the
        directory lock while its etag is ``if_match``; else replace it. Returns the new etag;
        a failed condition raises StorageError(ConcurrentWrite). ``metadata`` is not kept."""
        target = to_path(uri)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(target)
            try:
                with tmp.open("wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                    etag = etag_of(os.fstat(fh.fileno()))
                if if_none_match:
                    try:
                        os.link(tmp, target)
                    except FileExistsError:
                        raise _conflict(uri, "already exists (written by another writer)") from None
                elif if_match is not None:
                    with dir_lock(target.parent):
                        current = self.stat(uri)
                        if current is None or current.etag != if_match:
                            raise _conflict(uri, "changed by another writer")
                        os.replace(tmp, target)
                else:
                    os.replace(tmp, target)
                fsync_dir(target.parent)
                return etag
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise os_error(exc, uri, "write") from None

    def copy(
        self,
        src_uri: str,
        dst_uri: str,
        metadata: Mapping[str, str],
        *,
        absent: bool = False,
        if_match: str | None = None,
    ) -> None:
        """Copy ``src_uri`` to a synced temporary file beside ``dst_uri`` (:func:`clone`:
        never a hard link) and then: with ``absent``, link it to ``dst_uri``, which fails if
        anything is there; with ``if_match``, rename it onto ``dst_uri`` under the directory
        lock while the file there has that etag; else rename it. A failed condition raises
        StorageError(ConcurrentWrite): a file someone wrote at the name since it was looked
        at is never replaced. ``metadata`` is not kept (a file has none)."""
        src, dst = to_path(src_uri), to_path(dst_uri)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(dst)
            try:
                clone(src, tmp)
                if absent:
                    try:
                        os.link(tmp, dst)
                    except FileExistsError:
                        raise _conflict(dst_uri, "written by someone else while kquant copied "
                                        "to it: left as it is") from None  # fmt: skip
                elif if_match is not None:
                    with dir_lock(dst.parent):
                        current = self.stat(dst_uri)
                        if current is None or current.etag != if_match:
                            raise _conflict(dst_uri, "changed by someone else while kquant "
                                            "copied to it: left as it is")  # fmt: skip
                        os.replace(tmp, dst)
                else:
                    os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(dst.parent)
        except OSError as exc:
            raise os_error(exc, dst_uri, f"copy {src_uri} to") from None

    def within(self, prefix_uri: str, key: str) -> bool:
        """Whether no folder between ``prefix_uri`` and ``key`` is a symlink (``lstat`` of
        each; an absent one is fine: kquant creates it). A fixed name under a linked folder
        was written and deleted through the link, outside the prefix (trial: a colleague's
        file beside the link's target removed as kquant's)."""
        folder = to_path(prefix_uri)
        for part in key.split("/")[:-1]:
            folder = folder / part
            try:
                mode = folder.lstat().st_mode
            except FileNotFoundError:
                return True
            except OSError:
                return False
            if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
                return False
        return True

    def content_sha256(self, uri: str, info: ObjectInfo) -> str | None:
        """Hex SHA-256 of the file (read in full: a file has no metadata to hold it)."""
        try:
            return sha256_file(to_path(uri))
        except OSError:
            return None

    def list_uploads(self, prefix_uri: str) -> list[Upload]:
        """Temporary ``*.kquant-part`` files below ``prefix_uri`` (links not followed), with
        their mtimes and whether their writer still runs. One renamed into place or removed
        while the tree is walked, or in a folder removed meanwhile, is not listed: another
        writer's marker, renamed between the walk and its stat, failed a concurrent run as
        SourceNotFound (full-suite run)."""
        root = to_path(prefix_uri)
        found: list[Upload] = []
        if not root.is_dir():
            return found
        for folder, _, names in os.walk(root):  # a folder gone meanwhile is skipped
            for name in names:
                if not name.endswith(TEMP_SUFFIX) or temp_target(name) is None:
                    continue  # not kquant's format: a user's "x.kquant-part"
                path = Path(folder) / name
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue  # renamed into place or removed since the walk
                except OSError as exc:
                    raise os_error(exc, prefix_uri, "list") from None
                if stat.S_ISREG(st.st_mode):
                    key = path.relative_to(root).as_posix()
                    found.append(Upload(key, key, st.st_mtime, temp_writer_alive(name)))
        return sorted(found, key=lambda u: u.key)

    def prune(self, prefix_uri: str) -> None:
        """Remove the empty directories at and below ``prefix_uri``, deepest first, links
        never followed; a directory holding anything stays (a set folder's tree was left
        behind by every removed set: fault-injection trial)."""
        root = to_path(prefix_uri)
        if root.is_symlink() or not root.is_dir():
            return
        for folder, _, _ in os.walk(root, topdown=False):
            with contextlib.suppress(OSError):  # not empty, or gone: either is fine
                os.rmdir(folder)

    def abort_upload(self, prefix_uri: str, upload: Upload) -> None:
        """Remove the temporary file of ``upload``."""
        if temp_target(upload.key.rsplit("/", 1)[-1]) is None:
            raise StorageError(
                f"{upload.key!r} under {prefix_uri} is not a temporary file",
                reason=Reason.UnsafePath,
            )
        self.delete(join(prefix_uri, upload.key))


def _checked_source(
    uri: str, skip: Callable[[str], bool] | None
) -> tuple[Path, list[tuple[str, Path]] | None]:
    """The source path of ``uri`` and, for a prefix, its (key, file) pairs without the keys
    ``skip`` leaves out, after the checks every read makes: an object URI naming a directory,
    or a prefix that is missing or holds no files, raises StorageError(SourceNotFound); an
    unsafe entry (symlink leaving the tree, loop, special file) or key raises
    StorageError(UnsafePath)."""
    src = to_path(uri)
    if not is_prefix(uri):
        if src.is_dir():
            raise StorageError(
                f"{uri} is a directory; end the URI with '/' to fetch it as a prefix",
                reason=Reason.SourceNotFound,
            )
        if src.is_symlink() and not src.resolve().is_relative_to(src.parent.resolve()):
            # as inside a folder source: a link planted in the folder reads someone else's file
            raise _refuse(uri, src.name, "symlink pointing outside its folder")
        return src, None
    if not src.is_dir():
        if src.is_file():  # "model.onnx/": a file named as a folder
            raise StorageError(
                f"{uri} names a file, not a directory: drop the trailing '/' to fetch the file",
                reason=Reason.SourceNotFound,
            )
        raise StorageError(f"no directory at {uri}", reason=Reason.SourceNotFound)
    try:
        pairs = _walk(src, uri)
    except OSError as exc:
        raise os_error(exc, uri, "list") from None
    pairs = [(key, path) for key, path in pairs if not (skip and skip(key))]
    if not pairs:
        raise StorageError(f"no files under {uri}", reason=Reason.SourceNotFound)
    check_keys([key for key, _ in pairs], uri)
    return src, pairs


def _size(path: Path, uri: str) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise os_error(exc, uri, "stat") from None


def open_beneath(path: Path) -> BinaryIO:
    """The regular file at ``path`` (an absolute path whose symlinks are already resolved),
    opened for reading one component at a time from ``/`` without following any symlink
    (``O_NOFOLLOW`` on each): a component swapped for a symlink after the path was checked
    fails (ELOOP, ENOTDIR) instead of leading out of the checked tree, where a plain
    ``open`` of the checked path would follow it (a race a helper's trial won within 30
    polls while the worker copied an 800 MB file before it). Raises OSError; StorageError
    (UnsafePath) when the file opened is not a regular file."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    parts = path.parts
    fd = os.open("/", flags | os.O_DIRECTORY)
    try:
        for part in parts[1:-1]:
            inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        # O_NONBLOCK: a FIFO swapped in does not block the open
        leaf = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(leaf).st_mode):
        os.close(leaf)
        raise StorageError(f"{path}: not a regular file", reason=Reason.UnsafePath)
    os.set_blocking(leaf, True)
    return os.fdopen(leaf, "rb")


def _open_regular(src: Path, uri: str, regular: bool) -> BinaryIO:
    """``src`` opened for reading; with ``regular``, without blocking on a FIFO and refused
    (StorageError UnsafePath) unless it is a regular file (a symlink to ``/dev/zero`` would
    never end)."""
    if not regular:
        return src.open("rb")
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StorageError(f"{uri} is not a regular file", reason=Reason.UnsafePath)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _copy(
    src: Path,
    target: Path,
    uri: str,
    action: str,
    *,
    hashed: bool = False,
    checked: bool = False,
    limit: int | None = None,
) -> tuple[str, int]:
    """Copy ``src`` to ``target`` through a temporary file; returns (hex sha256 or '', bytes).
    Uploads are durable (fsynced); downloads land in the work directory and are not (see
    :func:`atomic_target`). ``checked``: ``src`` is a resolved path a walk checked, opened
    without following symlinks (:func:`open_beneath`). ``limit``: the size the source had
    when checked; a source that is not a regular file then (a FIFO, a device) is refused,
    and one that grew past it is StorageError(ConcurrentWrite), the copy removed."""
    digest = hashlib.sha256() if hashed else None
    size = 0
    durable = action != "download"
    try:
        fin_cm = open_beneath(src) if checked else _open_regular(src, uri, limit is not None)
        with fin_cm as fin, atomic_target(target, durable) as tmp, tmp.open("wb") as fout:
            while block := fin.read(CHUNK):
                if digest is not None:
                    digest.update(block)
                fout.write(block)
                size += len(block)
                if limit is not None and size > limit:
                    raise StorageError(
                        f"cannot {action} {uri}: {src.name} grew past the {limit} bytes it "
                        "held when checked: the source changed while the job read it",
                        reason=Reason.ConcurrentWrite,
                    )
    except OSError as exc:
        if checked and exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StorageError(
                f"cannot {action} {uri}: {src} became a symlink (or passes through one) after "
                "the tree was checked: refused, not followed",
                reason=Reason.UnsafePath,
            ) from None
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
        try:
            with os.scandir(directory) as entries:
                names = sorted(entry.name for entry in entries)
        except FileNotFoundError:
            continue  # removed since it was seen (a set folder being withdrawn)
        for name in names:
            key = rel + name
            path = directory / name
            if temp_target(name) is not None or not os.path.lexists(path):
                # A write in progress (renamed away any moment: a concurrent writer's, seen
                # as "not a regular file" once it was gone), or removed since the listing.
                continue
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
            elif os.path.lexists(path):  # else removed since the check above: gone
                raise _refuse(where, key, "not a regular file")
    return sorted(found)


def _refuse(where: str, key: str, why: str) -> StorageError:
    return StorageError(f"refusing {key!r} under {where}: {why}", reason=Reason.UnsafePath)
