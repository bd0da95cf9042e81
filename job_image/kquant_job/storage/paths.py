"""Local-path safety shared by the back ends: key checks and atomic file placement.

Object stores allow keys that a file system cannot mirror safely: ``../evil`` escapes the
destination, ``/abs`` is absolute, ``a//b`` and ``a/./b`` alias ``a/b``, and ``x`` beside
``x/y`` needs ``x`` to be both a file and a directory. A prefix download checks every key
with :func:`check_keys` before it writes anything, so a hostile listing leaves no trace.
:func:`atomic_target` gives every written file a temporary name in its destination directory
until it is complete and synced, so a killed transfer never leaves a file that looks whole.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import os
import re
import secrets
import socket
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kquant_api import Reason
from kquant_job.errors import StorageError

# ext4, xfs and most others cap one path segment at 255 bytes.
MAX_SEGMENT_BYTES = 255


def _unsafe(where: str, key: str, why: str) -> StorageError:
    return StorageError(f"unsafe key {key!r} under {where}: {why}", reason=Reason.UnsafePath)


def check_key(key: str, where: str) -> None:
    """Raise StorageError(UnsafePath) unless ``key`` is a plain relative '/'-separated path:
    no leading '/', no backslash or NUL, no empty, '.' or '..' segment, every segment valid
    UTF-8 of at most 255 bytes. ``where`` (the prefix URI) goes into the message."""
    if not key:
        raise _unsafe(where, key, "empty key")
    if key.startswith("/"):
        raise _unsafe(where, key, "absolute key")
    if "\\" in key or "\x00" in key:
        raise _unsafe(where, key, "backslash or NUL in key")
    for seg in key.split("/"):
        if seg == "":
            raise _unsafe(where, key, "empty path segment")
        if seg in (".", ".."):
            raise _unsafe(where, key, f"'{seg}' path segment")
        try:
            size = len(seg.encode("utf-8"))
        except UnicodeEncodeError:  # a local name's bytes that are not UTF-8 (os.fsdecode)
            raise _unsafe(where, key, "not valid UTF-8, as object stores need") from None
        if size > MAX_SEGMENT_BYTES:
            raise _unsafe(where, key, f"path segment longer than {MAX_SEGMENT_BYTES} bytes")


def check_keys(keys: Iterable[str], where: str) -> list[str]:
    """Validate every relative key of a prefix listing and return the ones to fetch.

    Keys ending in '/' are directory markers (what consoles create for "folders") and are
    dropped. The rest must pass :func:`check_key`, must not collide once Unicode-normalized
    (NFC: 'é' precomposed and decomposed are one name on some file systems), and no key may
    also be a directory of another ('x' and 'x/y'). Raises StorageError(UnsafePath) naming the
    first offending key; returns the kept keys in their given order.
    """
    kept: list[str] = []
    seen: dict[str, str] = {}
    for key in keys:
        if key.endswith("/"):
            continue
        check_key(key, where)
        if key.endswith(TEMP_SUFFIX):  # kquant's own, unfinished: never a source file
            raise _unsafe(where, key, f"ends in {TEMP_SUFFIX}, kquant's suffix for unfinished "
                          "writes: rename it")  # fmt: skip
        norm = unicodedata.normalize("NFC", key)
        if norm in seen:
            raise _unsafe(where, key, f"collides with key {seen[norm]!r}")
        seen[norm] = key
        kept.append(key)
    dirs: dict[str, str] = {}  # every parent directory -> a key below it
    for norm, key in seen.items():
        parts = norm.split("/")
        for i in range(1, len(parts)):
            dirs.setdefault("/".join(parts[:i]), key)
    for norm, key in seen.items():
        if norm in dirs:
            raise _unsafe(where, key, f"is a file and also the directory of key {dirs[norm]!r}")
    return kept


def local_target(dest_dir: Path, key: str, where: str) -> Path:
    """``dest_dir / key`` for a checked key, refusing a path that resolves outside
    ``dest_dir`` (e.g. through a symlink already present in it)."""
    root = dest_dir.resolve()
    target = root.joinpath(*key.split("/"))
    if not target.parent.resolve().is_relative_to(root):
        raise _unsafe(where, key, "resolves outside the destination directory")
    return target


# The largest pid Linux hands out (PID_MAX_LIMIT, 2**22 on 64-bit).
PID_MAX = 2**22
# Suffix of the temporary files atomic_target writes: such a file is never a finished object.
TEMP_SUFFIX = ".kquant-part"


@functools.cache  # one process, one table: read once, not for every temporary file
def _host_tag() -> str:
    """8 hex digits naming where a pid means this process table: the host name, the boot
    (``/proc/sys/kernel/random/boot_id``) and the PID namespace (the inode of
    ``/proc/self/ns/pid``). Two containers sharing a volume and a host name (host network)
    have PID namespaces of their own: with the host name alone, a reclaimer saw another
    namespace's live writer as a dead pid of its own and deleted its temporary file (trial)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        parts.append("")
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        parts.append("")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


def temp_path(target: Path) -> Path:
    """A fresh temporary name beside ``target``: short, hidden and clearly partial (it
    survives a 255-byte name and never looks complete), naming the writing process (a hash
    of the host name and the pid) so a later run can tell one left by a dead writer
    (:func:`temp_writer_alive`)."""
    owner = f"{_host_tag()}-{os.getpid()}"
    return target.parent / f".{target.name[:80]}.{owner}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


# The whole name temp_path gives: ".<target name, 80 chars at most>.<host tag>-<pid>.<8 hex>"
# plus the suffix. A file merely ending in the suffix (a user's "notes.kquant-part") is no
# temporary file of kquant's: never hidden, never reclaimed.
_TEMP_NAME = re.compile(
    r"^\.(?P<target>.{1,80})\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[0-9a-f]{8}"
    + re.escape(TEMP_SUFFIX)
    + "$",
    re.DOTALL,
)


def temp_target(name: str) -> str | None:
    """The target name (cut to 80 characters, as :func:`temp_path` cuts it) of a file name
    :func:`temp_path` made, or None for any other name."""
    match = _TEMP_NAME.match(name)
    return match.group("target") if match else None


def temp_writer_alive(name: str) -> bool | None:
    """Whether the process that is writing the temporary file ``name`` still runs: None when
    the name does not say or the writer ran on another host, boot or PID namespace (a pid
    means nothing there: :func:`_host_tag`)."""
    parts = name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
    if len(parts) != 3 or "-" not in parts[1]:
        return None
    host, _, pid = parts[1].partition("-")
    # a pid past Linux's limit (2**22) is no process's: a planted name with 20 digits made
    # os.kill raise OverflowError, and every publish to the prefix crashed (trial)
    if host != _host_tag() or not pid.isdigit() or not 0 < int(pid) <= PID_MAX:
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except (OverflowError, ValueError, OSError):
        return None
    return True


@contextmanager
def dir_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` (created if missing) for the block.

    kquant's local compare-and-swap steps (a conditional replace or delete) take it, so two
    processes on one host never interleave a check and the write it guards. OSError passes
    through for the caller to classify."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def atomic_target(target: Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (parents created) to write into. On a clean
    exit the file is renamed onto ``target`` (``os.replace``: atomic on POSIX); on any error
    the temporary file is removed. OSError passes through for the caller to classify.

    ``durable`` (for outputs) fsyncs the file before the rename and the directory after it,
    so the object survives a machine crash. Downloads into the work directory pass False: the
    directory does not outlive the pod, and a killed process loses nothing the kernel holds,
    so the rename alone keeps a partial file from being seen (the fsync cost 0.2 s per 400 MB).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        yield tmp
        if durable:
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
        if durable:
            fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename or link inside it survives a crash; file systems
    that cannot open directories are skipped (the data itself is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open directories; the data itself is synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_error(exc: OSError, uri: str, action: str) -> StorageError:
    """Classify a local OSError: missing path -> SourceNotFound, permission or read-only file
    system -> AccessDenied, anything else (disk full, I/O error) -> StorageUnavailable. The
    message names ``uri`` and the local path involved."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        reason = Reason.SourceNotFound
    elif isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
        reason = Reason.AccessDenied
    else:
        reason = Reason.StorageUnavailable
    name = os.fsdecode(exc.filename) if exc.filename is not None else ""
    # a relative path resolves against the working directory, not the spec file: show it
    shown = os.path.abspath(name) if name and not os.path.isabs(name) else name
    where = f" ({shown})" if shown and shown != uri else ""
    return StorageError(f"cannot {action} {uri}: {exc.strerror or exc}{where}", reason=reason)


def check_size(uri: str, total: int, max_bytes: int | None) -> None:
    """Raise StorageError(SourceTooLarge) when ``total`` bytes at ``uri`` exceed
    ``max_bytes`` (no bound when None)."""
    if max_bytes is not None and total > max_bytes:
        raise StorageError(
            f"{uri} holds {total} bytes, more than this job can fetch ({max_bytes} bytes: "
            "see the work volume, spec.resources.limits.ephemeral-storage)",
            reason=Reason.SourceTooLarge,
        )
