"""Quantization passes, one module each; :func:`select_pass` picks one for a spec."""

from __future__ import annotations

from kquant_api import Int8Mode, ModelFormat, Precision, QuantizationConfig, Reason
from kquant_job.errors import PassError
from kquant_job.passes.base import Pass, PassContext, PassResult, Probe, ProbeResult

__all__ = ["Pass", "PassContext", "PassResult", "Probe", "ProbeResult", "select_pass"]


def select_pass(fmt: ModelFormat, config: QuantizationConfig) -> Pass:
    """The pass for a model format and a quantization config.

    Raises PassError(UnsupportedFormat) when no pass applies.
    """
    if fmt is ModelFormat.onnx:
        if config.precision is Precision.fp16:
            from kquant_job.passes.onnx_fp16 import OnnxFp16Pass

            return OnnxFp16Pass()
        if config.int8_mode is Int8Mode.dynamic:
            from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass

            return OnnxInt8DynamicPass()
        from kquant_job.passes.onnx_int8_static import OnnxInt8StaticPass

        return OnnxInt8StaticPass()
    raise PassError(
        f"no {config.precision.value} pass for format {fmt.value} yet "
        "(this release converts ONNX models)",
        reason=Reason.UnsupportedFormat,
    )
