"""One validator per model format, behind one small interface the pipeline uses.

- ONNX and TorchScript can run: their outputs are compared on the same inputs
  (``kind = "outputs"``; :class:`OnnxValidator`, :class:`~kquant_job.validate.torch_outputs.
  TorchScriptValidator`).
- A bare state dict or a safetensors file cannot run without its code: its tensors are
  compared instead (``kind = "tensors"``; :class:`~kquant_job.validate.tensors.
  TensorValidator`).

A validator is built *before* the conversion (so a validation spec the original cannot run
on fails fast, and self-repairing passes get its ``probe``) and checks the converted file
after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from kquant_api import ModelFormat, Precision, QuantizationJobSpec
from kquant_job import logs
from kquant_job.passes.base import Probe
from kquant_job.validate import reference_cache
from kquant_job.validate.compare import (
    Reference,
    ValidationOutcome,
    recorder_or_none,
    validate_onnx,
)
from kquant_job.validate.inputs import resolve_feeds
from kquant_job.validate.reference_cache import CachedReference, cache_key
from kquant_job.validate.runtime import make_session, select_providers


class Validator(Protocol):
    """Checks converted files against one original model."""

    kind: str  # "outputs" (the model ran) or "tensors" (weights compared)
    providers: list[str]  # onnxruntime execution providers (or torch-<device>) used
    probe: Probe | None  # quick check for self-repairing passes, when the model can run
    chosen: dict[str, Any] | None  # inputs found without help (discover.py), else None

    def validate(self, converted: Path) -> Any:
        """The outcome: ``passed``, ``violations``, ``summary()``, ``to_report()``."""
        ...


class OnnxValidator:
    """Runs the original ONNX model once on the validation feeds (:class:`Reference`)."""

    kind = "outputs"

    def __init__(
        self,
        original: Path,
        spec: QuantizationJobSpec,
        data_files: list[Path],
        ranges: bool = False,
        shared: Path | None = None,
    ) -> None:
        """``ranges``: the pass reads activation ranges (FP16, q4f16), measured in the same
        FP32 pass as the reference outputs when the model allows (:class:`Reference`).
        ``shared``: a folder where another variant's reference pass may be found (and this
        one is left when there is none: :mod:`~kquant_job.validate.reference_cache`)."""
        self.spec = spec
        providers = select_providers()[0]
        key = cache_key(original, spec.validation, data_files, providers) if shared else ""
        self._shared, self._key = shared, key
        cached = reference_cache.load(shared, key) if shared else None
        if cached is not None:
            logs.info("validation reference read from an earlier variant", model=original.name)
            self.cfg, self.chosen = cached.cfg, cached.chosen
            self.reference = Reference.from_outputs(
                original, cached.feeds, cached.cfg, spec.tolerance, providers,
                cached.outputs, cached.ranges, cached.device, cached.latency,
            )  # fmt: skip
        else:
            self._run_reference(original, spec, data_files, providers, ranges)
            if shared:
                ref = self.reference
                reference_cache.save(shared, key, CachedReference(
                    ref.feeds, ref.outputs, self.cfg, self.chosen, ref.ranges, ref.device,
                    ref.latency,
                ))  # fmt: skip
        # the original's latency, once timed (here, by a pass's timed probe or by validation),
        # is left for the next variants
        self._latency_shared = self.reference.latency is not None
        self.probe: Probe | None = self.reference.probe
        self.activation_ranges = self.reference.activation_ranges
        self.providers = self.reference.providers

    def _run_reference(
        self,
        original: Path,
        spec: QuantizationJobSpec,
        data_files: list[Path],
        providers: list[str],
        ranges: bool,
    ) -> None:
        cpu_only = providers == ["CPUExecutionProvider"]
        # Discovery runs on a CPU session; on a CPU-only machine the reference pass reuses
        # it (one FP32 session less: 0.5 s for BERT-base), a range recorder when ranges
        # are wanted.
        cpu = recorder_or_none(original, providers) if ranges and cpu_only else None
        cpu = cpu or make_session(original, ["CPUExecutionProvider"])
        feeds, self.cfg, self.chosen = resolve_feeds(original, spec.validation, data_files, cpu)
        reuse = cpu if cpu_only else None
        del cpu
        self.reference = Reference(
            original, feeds, self.cfg, spec.tolerance, providers, session=reuse, ranges=ranges
        )

    def validate(self, converted: Path) -> ValidationOutcome:
        """:func:`validate_onnx` against the reference."""
        ref = self.reference
        config = self.spec.conversions[0]
        # the gain rule's precisions (kquant_job.gain): a latency verdict is confirmed
        judged = config.precision in (Precision.int8, Precision.int4)
        outcome = validate_onnx(
            ref.original, converted, ref.feeds, self.cfg, self.spec.tolerance, reference=ref,
            confirm_slowdown=judged and config.requireGain is not False,
        )  # fmt: skip
        if self._shared and not self._latency_shared and ref.latency is not None:
            reference_cache.save_latency(self._shared, self._key, ref.latency)
            self._latency_shared = True
        return outcome


def make_validator(
    fmt: ModelFormat,
    original: Path,
    spec: QuantizationJobSpec,
    data_files: list[Path],
    shared: Path | None = None,
) -> Validator:
    """The validator for a model of format ``fmt`` at ``original``; ``shared``: the folder
    of the variants' shared reference pass (ONNX; None outside variants).

    Raises what the validators raise for the original (InvalidSpec for inputs it cannot run
    on; PassError CorruptModel/UnsafeModel when it does not load).
    """
    if fmt is ModelFormat.onnx:
        quant = spec.quantization
        ranges = quant.precision is Precision.fp16 or (
            quant.precision is Precision.int4 and quant.floatPrecision == "fp16"
        )
        return OnnxValidator(original, spec, data_files, ranges=ranges, shared=shared)
    if fmt is ModelFormat.torchscript:
        from kquant_job.validate.torch_outputs import TorchScriptValidator

        cpu_only = spec.quantization.precision is Precision.int8
        return TorchScriptValidator(
            original, spec.validation, spec.tolerance, data_files, cpu_only=cpu_only
        )
    from kquant_job.validate.tensors import TensorValidator

    return TensorValidator(original, fmt)


MAX_LOGGED_OUTPUTS = 32  # per model: the report lists more (compare.MAX_REPORTED_OUTPUTS)


def log_rows(outcome: Any) -> list[tuple[str, dict[str, Any]]]:
    """Lines for the job log: per output (the first MAX_LOGGED_OUTPUTS), or the worst tensors
    (tensors)."""
    if isinstance(outcome, ValidationOutcome):
        return [
            (
                f"  output {name}",
                {
                    "maxAbsError": _g(m.maxAbsError),
                    "meanAbsError": _g(m.meanAbsError),
                    "cosineSimilarity": _g(m.cosineSimilarity),
                    "newNonFinite": m.newNonFinite,
                },
            )
            for name, m in list(outcome.metrics.items())[:MAX_LOGGED_OUTPUTS]
        ]
    report = outcome.to_report()
    totals = {
        k: report[k] for k in ("tensors", "tensorsCast", "overflowValues", "flushToZeroValues")
    }
    rows = [("  tensors", totals)]
    for m in report["worst"][:3]:
        rows.append(
            (f"  tensor {m['name']}", {k: _g(m[k]) for k in ("maxAbsError", "maxRelError")})
        )
    return rows


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
