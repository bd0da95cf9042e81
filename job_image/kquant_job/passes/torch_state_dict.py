"""FP16/BF16 cast of a PyTorch checkpoint (``.pt``/``.pth``/``.bin``/``.ckpt``): a pickled,
possibly nested container of tensors, e.g. ``{"model": {...}, "epoch": 3}``.

The recipe kquant's users ran by hand (load the state dict, cast every FP32 parameter to
FP16, save), made safe and complete:

- loaded with ``torch.load(weights_only=True, map_location="cpu")``, memory-mapped for the
  zip container (see :func:`~kquant_job.passes.torch_common.load_checkpoint`);
- FP32/FP64 tensors cast to the target dtype; integer and bool tensors (``num_batches_tracked``,
  token tables), FP16/BF16 tensors and every non-tensor entry (epoch, config dicts, strings)
  kept as they are; tensors named by ``keepFp32`` (default: normalization statistics) kept;
- tensors that shared storage (tied weights) still share it after the cast;
- saved in the container it came in: the zip format or the legacy pickle stream.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from kquant_api import ModelFormat, QuantizationConfig
from kquant_job.passes.base import PassContext, PassResult
from kquant_job.passes.torch_common import (
    castable,
    is_zip,
    keep_pattern,
    load_checkpoint,
    require_torch,
    target_dtype,
    tensor_bytes,
)

MAX_LISTED = 50  # kept tensors named in the report; the rest are counted


class TensorCaster:
    """Casts the floating tensors of a nested container in place (dicts and lists mutated,
    tuples rebuilt), recording what it did for the report.

    ``dtype``: ``torch.float16`` or ``torch.bfloat16``; ``patterns``: keepFp32 globs matched
    on the dotted path of each tensor (dict keys and list indices joined by ``.``).
    """

    def __init__(self, dtype: Any, patterns: list[str]) -> None:
        self.torch = require_torch()
        self.dtype = dtype
        self.patterns = patterns
        self.memo: dict[tuple[Any, ...], Any] = {}
        self.cast = self.shared = self.other = 0
        self.cast_bytes = {"before": 0, "after": 0}
        self.kept: list[dict[str, str]] = []
        self.untouched: Counter[str] = Counter()

    def walk(self, obj: Any, path: str = "") -> Any:
        """``obj`` with its floating tensors cast (the same object for dicts and lists)."""
        if isinstance(obj, self.torch.Tensor):
            return self.tensor(obj, path)
        if isinstance(obj, dict):
            for key in list(obj):
                obj[key] = self.walk(obj[key], _join(path, key))
            return obj
        if isinstance(obj, list):
            for i, item in enumerate(obj):
                obj[i] = self.walk(item, _join(path, i))
            return obj
        if isinstance(obj, tuple):
            return tuple(self.walk(item, _join(path, i)) for i, item in enumerate(obj))
        self.other += 1
        return obj

    def tensor(self, t: Any, name: str) -> Any:
        """One tensor, cast unless it is not FP32/FP64 or ``keepFp32`` names it."""
        if not castable(t):
            self.untouched[str(t.dtype).replace("torch.", "")] += 1
            return t
        pattern = keep_pattern(name, self.patterns)
        if pattern is not None:
            self.kept.append({"name": name, "pattern": pattern})
            return t
        key = (_storage_ptr(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in self.memo:
            self.shared += 1
            return self.memo[key]
        out = t.detach().to(self.dtype)
        if isinstance(t, self.torch.nn.Parameter):
            out = self.torch.nn.Parameter(out, requires_grad=t.requires_grad)
        self.memo[key] = out
        self.cast += 1
        self.cast_bytes["before"] += tensor_bytes(t)
        self.cast_bytes["after"] += tensor_bytes(out)
        return out

    def details(self) -> dict[str, Any]:
        """What was cast, kept and left alone, for report.json."""
        return {
            "dtype": str(self.dtype).replace("torch.", ""),
            "tensorsCast": self.cast,
            "castBytes": dict(self.cast_bytes),
            "sharedTensors": self.shared,
            "keepFp32": list(self.patterns),
            "keptCount": len(self.kept),
            "kept": self.kept[:MAX_LISTED],
            "untouchedByDtype": dict(sorted(self.untouched.items())),
        }


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _storage_ptr(t: Any) -> int:
    try:
        return int(t.untyped_storage().data_ptr())
    except RuntimeError:  # no storage (meta/functional tensors): never shared
        return id(t)


class TorchStateDictPass:
    """Cast a ``torch.save`` checkpoint to FP16 or BF16 (see the module docstring)."""

    name: ClassVar[str] = "torch-state-dict-cast"
    formats: ClassVar[frozenset[ModelFormat]] = frozenset({ModelFormat.pytorch})

    def run(
        self, model_in: Path, config: QuantizationConfig, out_path: Path, ctx: PassContext
    ) -> PassResult:
        """Write the cast checkpoint to ``out_path``.

        Raises PassError(UnsafeModel) for a file ``weights_only=True`` refuses,
        PassError(CorruptModel) for one torch cannot read, PassError(UnsupportedFormat) when
        torch is missing.
        """
        torch = require_torch()
        caster = TensorCaster(target_dtype(config.precision), config.keep_fp32)
        obj = caster.walk(load_checkpoint(model_in, model_in.name))
        zipped = is_zip(model_in)
        torch.save(obj, out_path, _use_new_zipfile_serialization=zipped)
        details = {"container": "zip" if zipped else "legacy", **caster.details()}
        details["nonTensorEntries"] = caster.other
        ctx.log.info(
            "cast %d tensors of %s to %s (%d kept FP32)",
            caster.cast,
            model_in.name,
            details["dtype"],
            len(caster.kept),
        )
        return PassResult(out_path, details)
