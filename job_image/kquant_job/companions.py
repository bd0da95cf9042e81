"""The external-data files of a single-file ONNX source, fetched with it ("companions").

An ONNX model past protobuf's 2 GiB, and many smaller exports, keeps its tensors in files
beside the ``.onnx`` (``model.onnx.data``, or one file per tensor), named inside the model
(``TensorProto.external_data`` ``location``, relative to the model's folder:
https://onnx.ai/onnx/repo-docs/ExternalData.html). A job whose ``spec.model.uri`` names the
``.onnx`` alone gets them too, as onnxruntime would find them beside it:

- the names are read from the model by a sandboxed child (the parent never parses a model),
  and only when the file's bytes hold the key of such a reference
  (:func:`kquant_job.formats.may_hold_external_data`, a byte search): an ONNX model with
  embedded weights costs no sandbox start;
- each name is checked here again (the child's answer is no more trusted than the model):
  a relative path inside the model's folder, no ``..``, no backslash, no absolute path;
  anything else ends the job with UnsafePath before any transfer;
- a missing file ends it with SourceNotFound naming the file and where it was looked for;
- downloaded sources get the files beside the model in the work directory, after the
  work-space budget is checked with their sizes; a local source read in place keeps them
  where they are, and the sandbox may read those files (no others of the folder).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from kquant_api import ModelFormat, Reason
from kquant_job.errors import KquantError, StorageError
from kquant_job.formats import detect_format, may_hold_external_data
from kquant_job.sandbox.limits import Limits
from kquant_job.sandbox.runner import run_task
from kquant_job.storage import Storage, is_prefix, join

__all__ = ["companion_bytes", "companion_names", "fetch_companions"]


def companion_names(uri: str, local: Path, work: Path, limits: Limits) -> list[str]:
    """The external-data locations the ONNX file ``local`` (fetched or read in place from
    the single object ``uri``) references, each checked by :func:`_checked`; [] for a
    prefix, a file that is not ONNX, or one whose bytes hold no reference. Raises
    StorageError(UnsafePath) for a location outside the model's folder, PassError
    (CorruptModel...) when the sandboxed child cannot read the model."""
    if is_prefix(uri) or detect_format(local) is not ModelFormat.onnx:
        return []
    if not may_hold_external_data(local):
        return []
    task = {"task": "external", "external": {"path": str(local.resolve())}}
    result, _ = run_task(
        task, work / "sandbox-external", [work, local], limits, what="reading the model"
    )
    if not isinstance(result, list) or not all(isinstance(n, str) for n in result):
        raise KquantError("malformed sandbox outcome", reason=Reason.InternalError)
    return [_checked(uri, name) for name in result]


def _checked(uri: str, name: str) -> str:
    """``name`` when it is a plain relative path below the model's folder, else UnsafePath."""
    path = PurePosixPath(name)
    parts = name.split("/")
    unsafe = (
        not name
        or "\\" in name
        or "\x00" in name
        or path.is_absolute()
        or any(p in ("", ".", "..") for p in parts)
        or ":" in parts[0]  # a scheme or a drive, never a file beside the model
    )
    if unsafe:
        raise StorageError(
            f"{uri} references external data at {name!r}, which is not a file in its folder: "
            "refused (a model may only name files beside it)",
            reason=Reason.UnsafePath,
        )
    return name


def _uri_of(uri: str, name: str) -> str:
    return join(uri[: uri.rindex("/") + 1], name)


def companion_bytes(store: Storage, uri: str, names: list[str]) -> int:
    """Total bytes of the files ``names`` beside ``uri``; StorageError(SourceNotFound)
    naming the first one missing and where it was looked for, UnsafePath for a name held
    by something that is no file (a FIFO, a folder)."""
    total = 0
    for name in names:
        target = _uri_of(uri, name)
        info = store.stat(target)
        if info is None and store.occupied(target):
            raise StorageError(
                f"{uri} keeps tensor data in {name!r}, and {target} is not a regular file "
                "(a folder, link, FIFO or device): refused",
                reason=Reason.UnsafePath,
            )
        if info is None:
            raise _missing(uri, name)
        total += info.size
    return total


def fetch_companions(
    store: Storage, uri: str, local: Path, names: list[str], max_bytes: int, in_place: bool
) -> tuple[Path, ...]:
    """Make the files ``names`` readable beside the model ``local``. A local source read in
    place (``in_place``) keeps them where they are: their paths come back, for the sandbox
    to read, each a regular file that resolves inside the model's folder (a symlink out of
    it: UnsafePath). Otherwise they are downloaded beside ``local`` (at most ``max_bytes``
    each; :func:`companion_bytes` checked that they exist) and () comes back. Raises what
    :meth:`Storage.download` raises, SourceNotFound naming the model when one is missing."""
    found: list[Path] = []
    for name in names:
        target = _uri_of(uri, name)
        if not in_place:  # companion_bytes found it a moment ago
            store.download(target, (local.parent / name).parent, max_bytes)
            continue
        try:
            path = store.read_in_place(target)
        except StorageError as exc:
            if exc.reason is Reason.SourceNotFound:
                raise _missing(uri, name) from None
            raise
        if path is None:
            raise _missing(uri, name)
        if not path.is_relative_to(local.resolve().parent):
            raise StorageError(
                f"{target} resolves to {path}, outside the model's folder: refused",
                reason=Reason.UnsafePath,
            )
        found.append(path)
    return tuple(found)


def _missing(uri: str, name: str) -> StorageError:
    return StorageError(
        f"{uri} keeps tensor data in {name!r}, which is not at {_uri_of(uri, name)}: keep "
        "that file beside the model (or set spec.model.uri to the folder holding both)",
        reason=Reason.SourceNotFound,
    )
