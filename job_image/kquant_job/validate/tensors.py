"""Tensor validation: for weights that cannot run without their code (a bare state dict, a
safetensors file), compare the converted tensors with the originals, name by name.

Per floating tensor, in float64 (chunks of 4M elements, so memory stays bounded):

- ``maxAbsError`` = max |a - b|, ``meanAbsError`` = mean |a - b|, ``cosineSimilarity``;
- ``maxRelError`` = max |a - b| / |a| over values with |a| at or above the target's smallest
  normal number (FP16: 6.1e-5), where relative error is meaningful; smaller values are
  covered by the next count;
- ``flushToZero``: values non-zero in the original and zero after the cast (FP16 flushes
  |x| < 2^-25 ~ 3e-8 to zero);
- ``overflow``: values finite in the original and Inf after the cast (FP16: |x| >= 65520;
  65504 < |x| < 65520 round to 65504, FP16's largest value).

Verdict: an overflow fails validation (a weight that became Inf poisons every output it
touches); the fix is to keep that tensor FP32 with ``spec.quantization.keepFp32``, which the
message names. A new NaN, a missing tensor, a changed shape or a changed integer/bool tensor
fail too. Flushed values and rounding errors are reported, not judged: output tolerances do
not apply to weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kquant_api import ModelFormat, ValidationSummary

CHUNK = 1 << 22
MAX_LISTED = 10
# Violations a report lists: a file of 400 000 scalar tensors, each one a violation, sent an
# outcome past the sandbox's 64 MiB (hostile-input trial: InternalError after 3 minutes).
MAX_VIOLATIONS = 256


@dataclass
class TensorMetrics:
    """Comparison of one tensor (see the module docstring); ``exact`` for integer/bool."""

    name: str
    dtype: str
    converted_dtype: str
    elements: int
    exact: bool = False
    maxAbsError: float = 0.0
    meanAbsError: float = 0.0
    maxRelError: float = 0.0
    cosineSimilarity: float = 1.0
    overflow: int = 0
    flushToZero: int = 0
    newNaN: int = 0
    mismatches: int = 0

    def to_dict(self) -> dict[str, Any]:
        """camelCase fields for report.json."""
        out = dict(self.__dict__)
        out["convertedDtype"] = out.pop("converted_dtype")
        return out


def compare_tensor(name: str, a: Any, b: Any) -> TensorMetrics:
    """Metrics of original ``a`` against converted ``b`` (same shape; any dtypes)."""
    import torch

    m = TensorMetrics(name, _dt(a), _dt(b), int(a.numel()))
    if not a.is_floating_point():
        m.exact = True
        m.mismatches = int((a != b).sum()) if a.dtype == b.dtype else m.elements
        return m
    tiny = torch.finfo(b.dtype).tiny if b.is_floating_point() else 0.0
    flat_a, flat_b = a.detach().reshape(-1), b.detach().reshape(-1)
    total = dot = na = nb = 0.0
    for start in range(0, m.elements, CHUNK):
        x = flat_a[start : start + CHUNK].double()
        y = flat_b[start : start + CHUNK].double()
        fx, fy = torch.isfinite(x), torch.isfinite(y)
        m.overflow += int((fx & torch.isinf(y)).sum())
        m.newNaN += int((fx & torch.isnan(y)).sum())
        m.flushToZero += int((fx & (x != 0) & (y == 0)).sum())
        both = fx & fy
        x, y = x[both], y[both]
        err = (x - y).abs()
        if err.numel():
            m.maxAbsError = max(m.maxAbsError, float(err.max()))
            normal = x.abs() >= tiny
            if bool(normal.any()):
                m.maxRelError = max(m.maxRelError, float((err[normal] / x[normal].abs()).max()))
        total += float(err.sum())
        dot += float((x * y).sum())
        na += float((x * x).sum())
        nb += float((y * y).sum())
    m.meanAbsError = total / m.elements if m.elements else 0.0
    if na and nb:
        m.cosineSimilarity = float(min(1.0, max(-1.0, dot / (na**0.5 * nb**0.5))))
    elif na or nb:
        m.cosineSimilarity = 0.0
    return m


def _dt(t: Any) -> str:
    return str(t.dtype).replace("torch.", "")


def read_tensors(path: Path, fmt: ModelFormat) -> dict[str, Any]:
    """Every tensor of a checkpoint or safetensors file by dotted name (memory-mapped where
    the container allows). Raises PassError (UnsafeModel, CorruptModel) as the passes do."""
    import torch

    if fmt is ModelFormat.safetensors:
        from kquant_job.passes.safetensors_cast import read_safetensors

        return read_safetensors(path, path.name)[0]
    from kquant_job.passes.torch_common import load_checkpoint

    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{prefix}.{i}" if prefix else str(i))

    walk(load_checkpoint(path, path.name), "")
    return out


@dataclass
class TensorOutcome:
    """The tensor-by-tensor comparison of one converted file with its original."""

    passed: bool
    metrics: list[TensorMetrics]
    violations: list[str]
    original_bytes: int
    quantized_bytes: int
    error: str | None = None
    device: str = "cpu"
    cast: list[TensorMetrics] = field(default_factory=list)

    def summary(self) -> ValidationSummary:
        """Worst values over the cast tensors; ``samples`` counts the tensors compared."""
        cast = self.cast
        return ValidationSummary(
            passed=self.passed,
            samples=len(self.metrics),
            kind="tensors",
            device=self.device,
            maxAbsError=max((m.maxAbsError for m in cast), default=None),
            meanAbsError=max((m.meanAbsError for m in cast), default=None),
            cosineSimilarity=min((m.cosineSimilarity for m in cast), default=None),
        )

    def to_report(self) -> dict[str, Any]:
        """Totals, the worst tensors, every tensor with overflow or flushed values, and the
        violations, for report.json."""
        worst = sorted(self.cast, key=lambda m: -m.maxRelError)[:MAX_LISTED]
        flagged = [m for m in self.metrics if m.overflow or m.flushToZero or m.newNaN]
        summary = self.summary()
        report: dict[str, Any] = {
            "passed": self.passed,
            "device": self.device,
            "tensors": len(self.metrics),
            "tensorsCast": len(self.cast),
            "tensorsExact": sum(1 for m in self.metrics if m.exact),
            "overflowValues": sum(m.overflow for m in self.metrics),
            "flushToZeroValues": sum(m.flushToZero for m in self.metrics),
            "maxAbsError": summary.maxAbsError,
            "maxRelError": max((m.maxRelError for m in self.cast), default=None),
            "meanAbsError": summary.meanAbsError,
            "cosineSimilarity": summary.cosineSimilarity,
            "worst": [m.to_dict() for m in worst],
            "flagged": [m.to_dict() for m in flagged[:100]],
            "violations": self.violations[:MAX_VIOLATIONS],
            "originalBytes": self.original_bytes,
            "quantizedBytes": self.quantized_bytes,
        }
        if len(self.violations) > MAX_VIOLATIONS:
            report["violationsOmitted"] = len(self.violations) - MAX_VIOLATIONS
        if self.error:
            report["error"] = self.error
        return report


class TensorValidator:
    """Validates a converted checkpoint or safetensors file tensor by tensor."""

    kind = "tensors"
    probe = None
    chosen = None  # no inputs: the weights themselves are compared
    providers: list[str] = []  # noqa: RUF012 (never mutated: no onnxruntime involved)

    def __init__(self, original: Path, fmt: ModelFormat) -> None:
        self.original, self.fmt = Path(original), fmt

    def validate(self, converted: Path) -> TensorOutcome:
        """Compare every tensor of ``converted`` with the original's. Raises PassError when
        the *original* cannot be read; a converted file that cannot be read fails."""
        before = read_tensors(self.original, self.fmt)
        sizes = {
            "original_bytes": self.original.stat().st_size,
            "quantized_bytes": Path(converted).stat().st_size,
        }
        try:
            after = read_tensors(Path(converted), self.fmt)
        except Exception as exc:
            error = f"converted file failed to load: {exc}"
            return TensorOutcome(False, [], [error], error=error, **sizes)
        metrics, violations = [], []
        for name, a in before.items():
            b = after.get(name)
            if b is None:
                violations.append(f"tensor {name!r}: missing from the converted file")
                continue
            if tuple(a.shape) != tuple(b.shape):
                violations.append(f"tensor {name!r}: shape {tuple(b.shape)} != {tuple(a.shape)}")
                continue
            m = compare_tensor(name, a, b)
            metrics.append(m)
            violations += _violations(m)
        cast = [m for m in metrics if not m.exact and m.dtype != m.converted_dtype]
        return TensorOutcome(not violations, metrics, violations, cast=cast, **sizes)


def _violations(m: TensorMetrics) -> list[str]:
    tag = f"tensor {m.name!r}"
    out = []
    if m.overflow:
        out.append(
            f"{tag}: {m.overflow} value(s) overflow {m.converted_dtype} and became Inf; keep "
            f"it FP32 with spec.quantization.keepFp32: [{m.name!r}]"
        )
    if m.newNaN:
        out.append(f"{tag}: {m.newNaN} NaN value(s) where the original is finite")
    if m.exact and m.mismatches:
        out.append(f"{tag}: {m.mismatches} of {m.elements} integer/bool values changed")
    return out
