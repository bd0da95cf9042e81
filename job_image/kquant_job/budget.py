"""How many bytes of source a job may fetch: the bound DESIGN.md's safety rules ask for.

A job needs room in its work directory for the source, the converted copy and one
conversion attempt in scratch space (FP16: half the source each; INT8: a quarter, plus
onnxruntime's pre-processed FP32 copy): 2.5x the source covers every pass. The room is the
smaller of the work volume's size limit, which the operator passes as ``KQUANT_WORK_BYTES``
(the emptyDir ``sizeLimit``: the kubelet evicts a pod that outgrows it, and ``statvfs`` does
not show it), and the free space of the file system holding the work directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from kquant_job.errors import InvalidSpec

WORK_FACTOR = 2.5
WORK_BYTES_ENV = "KQUANT_WORK_BYTES"


def source_budget(work: Path, env: Mapping[str, str] | None = None) -> int:
    """Largest total source size in bytes the job at ``work`` (an existing directory) may
    fetch: room / WORK_FACTOR, room being min(free bytes at ``work``, ``KQUANT_WORK_BYTES``
    when set). Raises InvalidSpec when ``KQUANT_WORK_BYTES`` is not a positive integer."""
    env = os.environ if env is None else env
    room = shutil.disk_usage(work).free
    raw = env.get(WORK_BYTES_ENV)
    if raw:
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if limit <= 0:
            raise InvalidSpec(f"{WORK_BYTES_ENV}={raw!r}: expected a positive number of bytes")
        room = min(room, limit)
    return int(room / WORK_FACTOR)
