"""How much a job may store at once: the bound DESIGN's safety rules ask for, checked before
anything is fetched.

A job stores, at its peak, the source model, the validation and calibration samples, and
what the conversion writes beside them (converted copies, onnxruntime's pre-processed FP32
copies, candidates). The conversion's share is a factor of the source size, measured per
method by ``bench/bench_workdir.py`` (peak bytes of the work directory / source bytes, 40 and
100 MiB models, onnxruntime 1.31): ONNX INT8 4.0x (the source plus three pre-processed FP32
copies, dynamic and static alike; static with node recovery 4.3x, since the attempt loop
keeps at most three candidates on disk, where it once kept all of them: 36x), ONNX FP16
1.5x-2.5x (a copy of the FP32 weights beside larger models), PyTorch and TorchScript
FP16/BF16 1.5x, TorchScript INT8 1.25x.
:data:`WORK_FACTORS` adds headroom for extra attempts of the repair ladders. A Hugging Face
folder exported to ONNX adds its FP32 export (1x); ``auto`` on such a folder stays within the
INT8 factor's headroom (4.0x measured + 1x export <= 5x). A local source read where it lies
(not copied) takes 1x off the factor (``pipeline.fetch_inputs``).

The room is the smaller of the work volume's size limit, which the operator passes as
``KQUANT_WORK_BYTES`` (the emptyDir ``sizeLimit``: the kubelet evicts a pod that outgrows it,
and ``statvfs`` does not show it), and the free space of the file system holding the work
directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from kquant_api import ModelFormat, QuantizationConfig, Reason
from kquant_job.errors import InvalidSpec, StorageError

WORK_BYTES_ENV = "KQUANT_WORK_BYTES"
# Peak work-directory bytes per source byte (samples counted apart), by precision: the ONNX
# passes' (the larger) unless the spec declares a PyTorch format; bf16 applies to PyTorch only.
TORCH_FACTOR = 2.0
WORK_FACTORS = {"fp16": 3.0, "bf16": TORCH_FACTOR, "int8": 5.0, "int4": 4.0}


def work_factor(config: QuantizationConfig, declared: ModelFormat) -> float:
    """Peak work-directory bytes per source byte for this conversion (see the module
    docstring). ``declared``: the spec's model format (``auto``: the largest factor of the
    precision over the formats it applies to)."""
    precision = config.precision.value
    if declared is ModelFormat.transformers:  # the FP32 export, then the ONNX pass on it
        return 1.0 + WORK_FACTORS[precision]
    if declared not in (ModelFormat.auto, ModelFormat.onnx):
        return TORCH_FACTOR
    return WORK_FACTORS[precision]


def room(work: Path, env: Mapping[str, str] | None = None) -> int:
    """Bytes the job at ``work`` (an existing directory) may store: min(free bytes there,
    ``KQUANT_WORK_BYTES`` when set). Raises InvalidSpec when ``KQUANT_WORK_BYTES`` is not a
    positive integer."""
    env = os.environ if env is None else env
    free = shutil.disk_usage(work).free
    raw = env.get(WORK_BYTES_ENV)
    if raw:
        try:
            limit = int(raw)
        except ValueError:
            limit = 0
        if limit <= 0:
            raise InvalidSpec(f"{WORK_BYTES_ENV}={raw!r}: expected a positive number of bytes")
        free = min(free, limit)
    return int(free)


def check_budget(
    room_bytes: int, factor: float, source: tuple[str, int], samples: dict[str, int]
) -> None:
    """Refuse a job whose peak would exceed ``room_bytes``: the source (``(uri, bytes)``)
    times ``factor`` plus every sample set (``{uri: bytes}``) as they are. Raises
    StorageError(SourceTooLarge) naming each part, before any transfer."""
    uri, size = source
    need = int(size * factor) + sum(samples.values())
    if need <= room_bytes:
        return
    parts = [f"{uri}: {size} bytes x {factor:g} for the conversion"]
    parts += [f"{u}: {b} bytes" for u, b in samples.items()]
    raise StorageError(
        f"this job needs about {need} bytes of work space ({'; '.join(parts)}), more than "
        f"its {room_bytes} bytes (the work volume: spec.resources.limits.ephemeral-storage)",
        reason=Reason.SourceTooLarge,
    )
