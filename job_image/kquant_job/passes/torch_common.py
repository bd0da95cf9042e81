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
from kquant_job.passes.zip_check import check_archive

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
    """What torch's weights-only error says was refused, without its boilerplate (the
    PyTorch 2.6 notice, the request to file an issue, the link to the docs) and its advice
    on allowlisting the global (never for untrusted files), e.g. ``Trying to load
    unsupported GLOBAL posix.system whose module posix is blocked.`` or, for a pickle
    torch did not write, ``Unsupported operand 149``; at most 400 characters."""
    body = text.split("from a trusted source.", 1)[-1]
    body = body.split("WeightsUnpickler error:", 1)[-1]
    body = body.split("Check the documentation of torch.load", 1)[0]
    body = body.split(". Please use", 1)[0]
    return " ".join(body.split())[:400] or " ".join(text.split())[:400]


def _corrupt(display: str, exc: Exception) -> PassError:
    message = " ".join(str(exc).split())[:300]
    return PassError(
        f"{display}: torch cannot read the file: {type(exc).__name__}: {message}",
        reason=Reason.CorruptModel,
    )


def tensor_bytes(tensor: Any) -> int:
    """Bytes of a tensor's elements (numel x element size)."""
    return int(tensor.numel() * tensor.element_size())
