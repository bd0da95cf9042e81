"""Outputs pinned by their SHA-256 where model code runs (inside the sandboxed stage).

TorchScript is code, and it may write any file the stage may write: ``torch.from_file(path,
shared=True, size=n)`` maps a file, creating it when absent, and every later write to the
tensor lands in the file. A module's ``forward`` (run by validation) or ``__setstate__`` (run
by ``torch.jit.load``) can so rewrite a converted file after kquant wrote it, or drop new
files beside it, at any time while the process lives (``torch.jit._fork`` tasks run on).

So a file kquant writes from memory is written under a new name and renamed (a mapping made
earlier stays on the old inode), its digest kept in this process; :func:`read_pinned` gives
its bytes only while they still match, and the stage reports the digests so that the worker
publishes those bytes or nothing (:func:`kquant_job.pipeline.accept_staged`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kquant_api import Reason
from kquant_job.errors import PassError

_PINNED: dict[Path, str] = {}
_BLOCK = 1 << 20
_CODE_RAN: list[bool] = []  # set once a model holding code was loaded in this process


def note_model_code() -> None:
    """Record that model code was loaded (and may have run) in this process."""
    _CODE_RAN.append(True)


def model_code_ran() -> bool:
    """Whether :func:`note_model_code` was called in this process: from then on a file of
    the wrong kind in the stage's folder is model code's doing, not kquant's."""
    return bool(_CODE_RAN)


def write_pinned(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` (a temporary name, then renamed) and pin its SHA-256;
    returns the digest (hex)."""
    digest = hashlib.sha256(data).hexdigest()
    tmp = path.with_name(f".{path.name}.pinned")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    _PINNED[path.resolve()] = digest
    return digest


def pinned_digest(path: Path) -> str | None:
    """The digest :func:`write_pinned` recorded for ``path``, or None."""
    return _PINNED.get(path.resolve())


def read_pinned(path: Path) -> bytes | None:
    """The bytes of a pinned file (None when ``path`` is not pinned). Raises
    PassError(UnsafeModel) when they changed since they were written."""
    digest = pinned_digest(path)
    if digest is None:
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise changed(path.name)
    return data


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def changed(name: str) -> PassError:
    """The error for an output whose bytes changed after kquant wrote them."""
    return PassError(
        f"{name} changed after the conversion wrote it: the model's code wrote to its output "
        "(a model file is code; it may only read itself); nothing is published",
        reason=Reason.UnsafeModel,
    )
