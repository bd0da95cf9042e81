"""Validation: run the original and the converted model on the same inputs and measure.

Public API (used by the pipeline and by self-repairing passes):

- :func:`select_providers` -> the onnxruntime execution providers and device name used.
- :func:`prepare_feeds` -> input feeds from ``.npz`` files or generated from the signature.
- :class:`Reference` -> the original model's outputs, computed once; ``probe(candidate)``
  checks a candidate on a few samples (a :data:`~kquant_job.passes.Probe`).
- :func:`validate_onnx` -> full comparison: per-output metrics, NaN/Inf scan, latency,
  sizes, tolerance verdict (:class:`ValidationOutcome`).
- :func:`kquant_job.validate.validators.make_validator` -> the validator for any format:
  outputs compared for ONNX and TorchScript, tensors compared for state dicts and
  safetensors (:mod:`~kquant_job.validate.tensors`); the pipeline uses this one.
"""

from kquant_job.validate.compare import (
    Reference,
    ValidationOutcome,
    select_providers,
    validate_onnx,
)
from kquant_job.validate.inputs import prepare_feeds

__all__ = ["Reference", "ValidationOutcome", "prepare_feeds", "select_providers", "validate_onnx"]
