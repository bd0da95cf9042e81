"""Validation of a runnable PyTorch model (TorchScript): run the original and the converted
module on the same inputs and compare their outputs as ONNX models are compared
(:mod:`kquant_job.validate.metrics`: max/mean abs error, cosine, NaN/Inf, exact integers).

Inputs are the arguments of ``forward`` (its TorchScript schema gives names and types, not
shapes):

- from ``.npz`` files: one file per sample, arrays named after the arguments (tensors keep
  the file's dtype; a scalar argument such as ``sr`` may be a 0-d or 1-element array);
- discovered (:mod:`kquant_job.validate.discover_torch`): shapes and values tried on the
  original until it runs (speech frames for speech-like arguments, FP32 normal values
  otherwise); ``spec.validation.inputs.<name>.shape`` / ``.value`` win; arguments with a
  default value are left to it unless given.

Outputs are named ``output`` (one tensor), ``output_0``, ``output_1``... (a tuple or list,
nested ones as ``output_0_1``) or by key (a dict), so ``spec.validation.feedback`` can map
``{output_1: state}`` as for ONNX. A stateful module (one with a ``reset_states`` method,
like Silero VAD's) is reset before the stream and threads its own state through the
samples, in order, as in production.

Device: CUDA when torch sees a GPU, except for INT8 (PyTorch's quantized kernels are
CPU-only); else CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kquant_api import Reason, Tolerance, ValidationConfig
from kquant_job.errors import InvalidSpec, PassError
from kquant_job.validate.compare import ValidationOutcome, compare_outputs
from kquant_job.validate.inputs import read_npz
from kquant_job.validate.metrics import check_output_names, check_tolerance
from kquant_job.validate.runtime import paired_latency_ms

Args = dict[str, Any]
_SCALARS = {"int": np.int64, "float": np.float64, "bool": np.bool_}


def script_arguments(module: Any) -> list[tuple[str, str, bool]]:
    """``forward``'s arguments after ``self`` as ``(name, type, has_default)``; type as
    TorchScript writes it (``Tensor``, ``int``, ``Optional[Tensor]``...)."""
    args = module.forward.schema.arguments[1:]
    return [(a.name, str(a.type), a.has_default_value()) for a in args]


def prepare_args(
    module: Any, cfg: ValidationConfig, data_files: list[Path]
) -> tuple[list[Args], dict[str, Any] | None]:
    """One keyword-argument dict per sample for ``module.forward`` (see the module
    docstring), and what was chosen when they were discovered (None with data files).

    Raises InvalidSpec for an override naming no argument, an unreadable ``.npz`` file or
    one lacking a required argument, or arguments the module runs on none of (the message
    says what to add).
    """
    from kquant_job.validate.discover_torch import discover_args

    arguments = script_arguments(module)
    if data_files:
        files = sorted(data_files, key=lambda p: p.name)[: cfg.samples]
        return [_load_args(path, arguments) for path in files], None
    return discover_args(module, arguments, cfg)


def _to_arg(value: np.ndarray, type_: str, torch: Any) -> Any:
    if type_ in _SCALARS:
        return value.item()
    return torch.from_numpy(np.ascontiguousarray(value))


def _load_args(path: Path, arguments: list[tuple[str, str, bool]]) -> Args:
    import torch

    arrays = read_npz(path)
    args: Args = {}
    for name, type_, has_default in arguments:
        if name not in arrays:
            if has_default:
                continue
            raise InvalidSpec(
                f"validation data {path.name}: no array for forward argument {name!r} "
                f"(has: {', '.join(sorted(arrays)) or 'none'})"
            )
        args[name] = _to_arg(arrays[name], type_, torch)
    return args


def _named(value: Any, name: str, out: dict[str, Any]) -> None:
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _named(item, f"{name}_{i}", out)
    elif isinstance(value, dict):
        for key, item in value.items():
            _named(item, str(key), out)
    elif value is not None:
        out[name] = value


def _numpy(value: Any, torch: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16; exact in FP32
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def run_script(
    module: Any, samples: Sequence[Args], feedback: dict[str, str], device: str
) -> list[dict[str, np.ndarray]]:
    """Run ``module`` on each sample in order (after ``reset_states()`` when it has one);
    one ``{output name: array}`` per sample. With ``feedback``, output ``X`` of step i
    replaces argument ``feedback[X]`` of step i+1.

    Raises InvalidSpec for feedback names the module lacks, RuntimeError("sample i: ...")
    when the module fails on a sample.
    """
    import torch

    if module._c._has_method("reset_states"):
        module.reset_states()
    names = {n for n, _, _ in script_arguments(module)}
    results: list[dict[str, np.ndarray]] = []
    previous: dict[str, Any] = {}
    with torch.inference_mode():
        for i, sample in enumerate(samples):
            args = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()
            }
            for out, inp in feedback.items() if previous else ():
                args[inp] = previous[out]
            try:
                raw: dict[str, Any] = {}
                _named(module(**args), "output", raw)
            except Exception as exc:
                raise RuntimeError(f"sample {i}: {' '.join(str(exc).split())[-600:]}") from exc
            for out, inp in feedback.items():
                if out not in raw or inp not in names:
                    raise InvalidSpec(
                        f"spec.validation.feedback.{out}: the module has no output {out!r} or "
                        f"no argument {inp!r} (outputs: {', '.join(raw)}; arguments: "
                        f"{', '.join(sorted(names))})"
                    )
            previous = raw
            results.append({k: _output_array(k, v, torch) for k, v in raw.items()})
    return results


def _output_array(name: str, value: Any, torch: Any) -> np.ndarray:
    """``value`` as a numeric numpy array. Raises PassError(UnsupportedFormat) naming the
    output when it is none: a string, an object, a tensor of more dimensions than numpy
    holds (64) (trial: ValueError, then InternalError)."""
    try:
        array = _numpy(value, torch)
    except (TypeError, ValueError, RuntimeError) as exc:
        array, why = None, " ".join(str(exc).split())[:200]
    else:
        why = f"{array.dtype} values"
    if array is None or array.dtype.kind not in "biufc":
        raise PassError(
            f"output {name!r} of the module ({type(value).__name__}) cannot be compared: {why}; "
            "kquant validates numeric tensor outputs only",
            reason=Reason.UnsupportedFormat,
        )
    return array


def module_call(module: Any, sample: Args, device: str) -> Callable[[], None]:
    """One ``module(**sample)`` call on ``device``, in inference mode, CUDA synchronized
    (so its wall time is the work's, not the launch's)."""
    import torch

    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call() -> None:
        with torch.inference_mode():
            module(**args)
        sync()

    return call


class TorchScriptValidator:
    """Runs the original TorchScript module once at construction (so a bad validation spec
    fails before converting); :meth:`validate` compares a converted file with it."""

    kind = "outputs"
    probe = None

    def __init__(
        self,
        original: Path,
        cfg: ValidationConfig,
        tolerance: Tolerance,
        data_files: list[Path],
        *,
        cpu_only: bool = False,
    ) -> None:
        import torch

        from kquant_job.passes.torch_script import load_script

        self.original, self.cfg, self.tolerance = Path(original), cfg, tolerance
        self.device = "cuda" if torch.cuda.is_available() and not cpu_only else "cpu"
        self.providers = [f"torch-{self.device}"]
        self.module = load_script(self.original, self.original.name, self.device)
        self.samples, self.chosen = prepare_args(self.module, cfg, data_files)
        if not self.samples:
            raise InvalidSpec(f"no validation samples for {self.original.name}")
        try:
            self.outputs = run_script(self.module, self.samples, cfg.feedback, self.device)
        except RuntimeError as exc:
            raise InvalidSpec(
                f"the original module {self.original.name} fails on the validation inputs "
                f"({exc}); set spec.validation.inputs or check dataUri"
            ) from exc
        if self.outputs:
            check_output_names(tolerance, list(self.outputs[0]), self.original.name)

    def validate(self, converted: Path) -> ValidationOutcome:
        """Compare ``converted`` with the original on every sample; never raises for the
        converted module's faults (load/run failure gives ``passed=False``)."""
        from kquant_job.passes.torch_script import load_script

        cfg = self.cfg
        common: dict[str, Any] = dict(
            samples=len(self.samples),
            device=self.device,
            provider=self.providers[0],
            tolerance=self.tolerance,
            original_bytes=self.original.stat().st_size,
            quantized_bytes=Path(converted).stat().st_size,
            feedback=dict(cfg.feedback),
        )
        try:
            module = load_script(Path(converted), Path(converted).name, self.device)
            outputs = run_script(module, self.samples, cfg.feedback, self.device)
        except Exception as exc:
            error = f"converted module failed: {' '.join(str(exc).split())[:600]}"
            return ValidationOutcome(
                passed=False, metrics={}, violations=[error], error=error, **common
            )
        metrics = compare_outputs(self.outputs, outputs, self.tolerance.decisions)
        violations = check_tolerance(metrics, self.tolerance)
        first = self.samples[0]
        latency = paired_latency_ms(
            module_call(self.module, first, self.device),
            module_call(module, first, self.device),
            cfg.latencyRuns,
            cfg.warmupRuns,
            cfg.latencyBudgetMs,
            cfg.latencyPrecision,
        )
        return ValidationOutcome(
            passed=not violations,
            metrics={m.name: m for m in metrics},
            violations=violations,
            latency_ms=latency,
            **common,
        )
