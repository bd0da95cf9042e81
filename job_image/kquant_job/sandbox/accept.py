"""What the worker takes from the sandboxed stage's folder (worker side, after the child
ended): the converted files it declared, and the unchanged copies, made here.

The child ran model code (TorchScript is code), which may write any file the child may
write: its staged folder included. So the worker copies the files the set takes unchanged
from the source itself, then accepts the folder only when it holds exactly the declared
converted files and those copies, plain files all, and each converted file the stage
pinned (:mod:`kquant_job.pinned`) still has the digest the conversion gave it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from kquant_api import Reason
from kquant_job.errors import KquantError, PassError, StorageError
from kquant_job.pinned import changed, file_sha256
from kquant_job.sandbox.limits import allocated_bytes, disk_allowance
from kquant_job.stage import StageInput, StageOutcome, stray_files
from kquant_job.storage.file import open_beneath


def staged_files(staged: Path) -> list[str]:
    """The files the sandbox staged, '/'-separated and sorted; each must be a regular file
    with one link (a symlink or hard link could make the upload read a file outside the
    sandbox). Raises PassError(UnsafeModel) naming the first that is not."""
    found = []
    for root, dirs, files in os.walk(staged):
        for name in dirs + files:
            path = Path(root) / name
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode) and not path.is_symlink():
                continue
            rel = path.relative_to(staged).as_posix()
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise PassError(
                    f"the sandboxed stage left {rel!r}, which is not a plain file (a link or "
                    "a special file): nothing is published",
                    reason=Reason.UnsafeModel,
                )
            found.append(rel)
    return sorted(found)


def accept_staged(stage: StageOutcome, io: StageInput) -> list[str]:
    """Copy ``stage.copied_from`` from the source into ``io.staged``, then check the folder
    (see the module); returns its files ('/'-separated, sorted). Raises PassError
    (UnsafeModel) for a file no conversion wrote, a converted file whose bytes changed, or a
    link; StorageError(UnsafePath) for a copy whose source path leaves the source folder;
    KquantError(InternalError) for a declared file that is missing."""
    root = (io.source if io.source.is_dir() else io.source.parent).resolve()
    staged = io.staged.resolve()
    # what the work volume has left (a source read in place grows under its owner's hand:
    # a red-team trial made a 1 KB file a sparse GiB while the stage ran)
    room = disk_allowance(staged.parent) - allocated_bytes(staged.parent)
    for out, rel in stage.copied_from.items():
        src, dst = _inside(root, rel), _inside(staged, out)
        try:  # the source may be the user's folder, read in place: no symlink is followed
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open_beneath(src) as fin, open(dst, "xb") as fout:
                room -= _copy_bounded(fin, fout, stage.copy_bytes.get(out), room, rel)
        except (FileExistsError, NotADirectoryError):  # the stage writes no copy: model code did
            taken = next((p for p in (dst, *dst.parents) if p.is_file()), dst)
            raise stray_files([taken.relative_to(staged).as_posix()]) from None
        except OSError as exc:
            raise StorageError(
                f"{rel}: cannot be copied from the source ({exc.strerror or exc}); was it "
                "replaced while the job ran?",
                reason=Reason.UnsafePath,
            ) from None
    files = staged_files(staged)
    declared = {f for m in stage.models for f in m.out_files} | set(stage.copies)
    if strays := sorted(set(files) - declared):
        raise stray_files(strays)
    if missing := sorted(declared - set(files)):
        raise KquantError(
            f"the sandboxed stage declared {', '.join(missing[:3])} and did not write it",
            reason=Reason.InternalError,
        )
    for model in stage.models:
        for rel, digest in model.sha256.items():
            if file_sha256(staged / rel) != digest:
                raise changed(rel)
    return files


def _copy_bounded(fin: BinaryIO, fout: BinaryIO, planned: int | None, room: int, rel: str) -> int:
    """Copy ``fin`` to ``fout``; returns the bytes copied. StorageError(ConcurrentWrite)
    past ``planned`` bytes (the size when the stage planned it), SourceTooLarge past
    ``room`` (what the work volume has left)."""
    done = 0
    while block := fin.read(1 << 20):
        done += len(block)
        if planned is not None and done > planned:
            raise StorageError(
                f"{rel} grew past the {planned} bytes it held when the job planned it: the "
                "source changed while the job ran",
                reason=Reason.ConcurrentWrite,
            )
        if done > room:
            raise StorageError(
                f"{rel}: the files copied unchanged take more than the {room} bytes the work "
                "volume has left (KQUANT_WORK_BYTES, or the free space)",
                reason=Reason.SourceTooLarge,
            )
        fout.write(block)
    return done


def _inside(root: Path, rel: str) -> Path:
    """``root / rel`` resolved, refused (UnsafePath) when it leaves ``root``."""
    path = (root / rel).resolve()
    if path == root or not path.is_relative_to(root) or Path(rel).is_absolute():
        raise StorageError(f"{rel!r} leaves its folder {root}", reason=Reason.UnsafePath)
    return path
