"""Shared pieces of the PyTorch passes: importing torch, safe loading, keepFp32 matching,
casting one tensor.

torch is imported here lazily (inside functions): the worker's ONNX path and the operator
never need it, and the ``job`` extra does not depend on it (the worker image installs it).

Loading is always ``torch.load(weights_only=True)``: the unpickler then rebuilds tensors,
containers and primitive values only, and refuses any other global (a ``__reduce__`` that
would call ``os.system``, a pickled ``nn.Module``) before executing it. A refused file ends
the job with ``UnsafeModel``; it is never retried with ``weights_only=False``.
"""

from __future__ import annotations

import fnmatch
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kquant_api import Precision, Reason
from kquant_job.errors import PassError

# Largest finite values; a cast of anything larger in magnitude gives Inf (fp16: values from
# 65520 up; 65504 < |x| < 65520 round down to 65504).
FP16_MAX = 65504.0
BF16_MAX = 3.3895313892515355e38


def require_torch() -> Any:
    """The ``torch`` module. Raises PassError(UnsupportedFormat) when it is not installed."""
    try:
        import torch
    except ImportError as exc:
        raise PassError(
            "PyTorch formats need torch, which is not installed here: install torch "
            "(the kquant-job image ships it)",
            reason=Reason.UnsupportedFormat,
        ) from exc
    return torch


def target_dtype(precision: Precision) -> Any:
    """``torch.float16`` or ``torch.bfloat16`` for a float precision.

    Raises PassError(UnsupportedFormat) for int8 (no cast target).
    """
    torch = require_torch()
    if precision is Precision.fp16:
        return torch.float16
    if precision is Precision.bf16:
        return torch.bfloat16
    raise PassError(
        f"no cast target for precision {precision.value}", reason=Reason.UnsupportedFormat
    )


def keep_pattern(name: str, patterns: Sequence[str]) -> str | None:
    """The first keepFp32 pattern matching the dotted tensor ``name``, or None.

    A pattern matches the whole name or any dotted suffix of it (``encoder.*`` matches
    ``model.encoder.0.weight``, so a state dict nested under ``model`` or ``state_dict``
    needs no prefix). fnmatch syntax, case-sensitive.
    """
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(s, pattern) for s in suffixes):
            return pattern
    return None


def castable(tensor: Any) -> bool:
    """True for a dense FP32 or FP64 tensor (what the float passes cast). FP16/BF16 tensors
    stay as they are, whichever the target; integer, bool, complex, quantized and sparse
    tensors are never touched."""
    torch = require_torch()
    return tensor.layout is torch.strided and tensor.dtype in (torch.float32, torch.float64)


def is_zip(path: Path) -> bool:
    """True for the zip container of ``torch.save`` (PyTorch >= 1.6), False for the legacy
    pickle stream."""
    return zipfile.is_zipfile(path)


# torch.save and torch.jit.save store their records uncompressed. A compressed record that
# inflates far beyond its stored bytes is how a 2 MB file becomes gigabytes in memory: torch's
# reader inflates a pickle record whole before unpickling it.
MAX_INFLATION = 100  # declared size / compressed size
INFLATION_FLOOR = 64 * 1024 * 1024  # bytes: smaller records are harmless at any ratio


def check_archive(path: Path, display: str) -> None:
    """Refuse a zip archive (a ``torch.save`` checkpoint or TorchScript file) whose records
    would inflate beyond INFLATION_FLOOR (64 MiB) and MAX_INFLATION (100x) their compressed
    size, one record or all of them together (eight records of 60 MiB of zeros each pass a
    per-record check), from the sizes its central directory declares, before anything is
    inflated (zip readers, torch's included, never inflate a record past its declared size).

    The directory checked must be the one torch reads: Python's zipfile finds it just before
    the end record (taking any gap for prepended bytes), torch's reader (miniz) at the offset
    the end record names; an archive where the two differ (a decoy directory before the end
    record, the real one elsewhere) is refused. torch writes neither gaps nor prefixes.

    Raises PassError(UnsafeModel) naming the record or the gap, PassError(CorruptModel) for
    an unreadable zip directory."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as fh:
            infos = archive.infolist()
            start = archive.start_dir
            # zipfile's own reader of the end record (zip64 included): the offset it names
            named = zipfile._EndRecData(fh)[zipfile._ECD_OFFSET]  # type: ignore[attr-defined]
    except (OSError, zipfile.BadZipFile, TypeError) as exc:
        raise _corrupt(display, exc) from None
    if start != named:
        raise PassError(
            f"{display}: refused before loading: its zip directory lies at byte {start}, "
            f"its end record names byte {named}: readers would disagree on its records "
            "(torch writes no such archive)",
            reason=Reason.UnsafeModel,
        )
    packed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
    for info in packed:
        if info.file_size > max(INFLATION_FLOOR, MAX_INFLATION * info.compress_size):
            what = f"record {info.filename!r} declares"
            raise _bomb(display, what, info.file_size, info.compress_size)
    inflated, stored = sum(i.file_size for i in packed), sum(i.compress_size for i in packed)
    if inflated > max(INFLATION_FLOOR, MAX_INFLATION * stored):
        raise _bomb(display, f"its {len(packed)} compressed records declare", inflated, stored)


def _bomb(display: str, what: str, inflated: int, stored: int) -> PassError:
    return PassError(
        f"{display}: refused before loading: {what} {inflated} bytes from {stored} "
        f"compressed ({inflated // max(stored, 1)}x): an archive bomb (torch writes its "
        "records uncompressed)",
        reason=Reason.UnsafeModel,
    )


def load_checkpoint(path: Path, display: str) -> Any:
    """A ``torch.save`` file loaded safely on the CPU, memory-mapped when it is a zip
    (tensors read from disk as touched, so peak memory stays near the converted copy).

    ``map_location="cpu"``: checkpoints saved from a GPU load on a CPU-only machine.
    Raises PassError(UnsafeModel) with torch's reason when ``weights_only=True`` refuses the
    file (it is never loaded otherwise) or the zip is an archive bomb (:func:`check_archive`),
    PassError(CorruptModel) when it does not parse.
    """
    torch = require_torch()
    zipped = is_zip(path)
    if zipped:
        check_archive(path, display)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights_only" in text or "Weights only" in text:
            raise PassError(
                f"{display}: refused: not loadable with torch.load(weights_only=True), "
                f"which would execute code from the file ({unpickler_reason(text)}); publish "
                "the model's state_dict, safetensors or TorchScript instead",
                reason=Reason.UnsafeModel,
            ) from None
        raise _corrupt(display, exc) from None
    except Exception as exc:
        raise _corrupt(display, exc) from None


def unpickler_reason(text: str) -> str:
    """The line of torch's weights-only error that says what was refused, e.g.
    ``Unsupported global: GLOBAL posix.system ...``; the whole text (trimmed) otherwise."""
    for line in text.splitlines():
        if "WeightsUnpickler error" in line:
            # drop torch's advice on allowlisting the global: never for untrusted files
            return line.strip().split(". Please use", 1)[0][:400]
    return " ".join(text.split())[:400]


def _corrupt(display: str, exc: Exception) -> PassError:
    message = " ".join(str(exc).split())[:300]
    return PassError(
        f"{display}: torch cannot read the file: {type(exc).__name__}: {message}",
        reason=Reason.CorruptModel,
    )


def tensor_bytes(tensor: Any) -> int:
    """Bytes of a tensor's elements (numel x element size)."""
    return int(tensor.numel() * tensor.element_size())
