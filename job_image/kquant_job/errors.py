"""Error classes of the worker. Each carries a :class:`~kquant_api.Reason`, which fixes the
process exit code and the status reason the operator reports.

Messages name the URI or file involved and never a credential.
"""

from __future__ import annotations

import re
from typing import Any

from kquant_api import REASON_EXIT_CODE, Reason

# How a runtime says an allocation failed (Python, onnxruntime, torch, numpy): the sandbox's
# memory limit was reached (MemoryLimitExceeded), whatever raised it.
ALLOCATION_FAILURE = re.compile(
    r"can't allocate memory|cannot allocate memory|not enough memory|std::bad_alloc|"
    r"out of memory|failed to allocate|Unable to allocate",
    re.IGNORECASE,
)


class KquantError(Exception):
    """Base class: a failure with a status reason and optional structured detail."""

    reason: Reason = Reason.InternalError

    def __init__(self, message: str, *, reason: Reason | None = None, **detail: Any) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.detail = detail

    @property
    def exit_code(self) -> int:
        """The process exit code for this error's reason."""
        return int(REASON_EXIT_CODE[self.reason])


class InvalidSpec(KquantError):
    """The manifest or spec is malformed. Never retried."""

    reason = Reason.InvalidSpec


class StorageError(KquantError):
    """Reading or writing a URI failed. Reasons: SourceNotFound, AccessDenied,
    OutputExists, UnsafePath, SourceTooLarge, ForeignObject, ConcurrentWrite, Superseded,
    StorageRejected, StorageUnavailable (only this one is retriable)."""

    reason = Reason.StorageUnavailable


class PassError(KquantError):
    """The model could not be read or converted. Reasons: UnsupportedFormat,
    CorruptModel, UnsafeModel (a pickle refused by ``torch.load(weights_only=True)``, an
    archive bomb, model code touching what its sandbox forbids), ConversionFailed,
    ModelCrashed, MemoryLimitExceeded, TimeLimitExceeded, DiskLimitExceeded (the
    sandboxed process's end)."""

    reason = Reason.ConversionFailed


class ValidationFailed(KquantError):
    """The converted model exceeded the validation tolerance."""

    reason = Reason.ValidationFailed
