"""Quantization passes, one module each; :func:`select_pass` picks one for a spec.

| format      | fp16 / bf16            | int8 dynamic             | int8 static        |
|-------------|------------------------|--------------------------|--------------------|
| onnx        | onnx_fp16 (fp16 only)  | onnx_int8_dynamic        | onnx_int8_static   |
| pytorch     | torch_state_dict       | -- (no code to quantize) | --                 |
| torchscript | torch_script           | torch_int8_dynamic (CPU) | --                 |
| safetensors | safetensors_cast       | -- (no code to quantize) | --                 |

int4 (weight-only, MatMul weights in 4 bits): onnx_int4, ONNX only.

transformers (a Hugging Face folder): exported to ONNX (transformers_export), then the
ONNX row applies.

Pass modules are imported on selection, so torch is imported only by the PyTorch passes.
"""

from __future__ import annotations

from kquant_api import Int8Mode, ModelFormat, Precision, QuantizationConfig, Reason
from kquant_job.errors import PassError
from kquant_job.passes.base import Pass, PassContext, PassResult, Probe, ProbeResult

__all__ = ["Pass", "PassContext", "PassResult", "Probe", "ProbeResult", "select_pass"]

_TORCH_FLOAT = {
    ModelFormat.pytorch: ("kquant_job.passes.torch_state_dict", "TorchStateDictPass"),
    ModelFormat.torchscript: ("kquant_job.passes.torch_script", "TorchScriptPass"),
    ModelFormat.safetensors: ("kquant_job.passes.safetensors_cast", "SafetensorsCastPass"),
}


def _unsupported(message: str) -> PassError:
    return PassError(message, reason=Reason.UnsupportedFormat)


def select_pass(fmt: ModelFormat, config: QuantizationConfig) -> Pass:
    """The pass for a model format and a quantization config (see the module table).

    Raises PassError(UnsupportedFormat) when no pass applies, saying why.
    """
    if fmt is ModelFormat.transformers:  # exported to ONNX first (transformers_export)
        return select_pass(ModelFormat.onnx, config)
    if config.precision is Precision.int4:
        if fmt is not ModelFormat.onnx:
            raise _unsupported(
                f"int4 weight-only quantization applies to ONNX models (MatMulNBits); for a "
                f"{fmt.value} model use fp16 or bf16"
                + (" or int8 (dynamic)" if fmt is ModelFormat.torchscript else "")
                + ", or export it to ONNX"
            )
        from kquant_job.passes.onnx_int4 import OnnxInt4Pass

        return OnnxInt4Pass()
    if fmt is ModelFormat.onnx:
        if config.precision is Precision.bf16:
            raise _unsupported(
                "precision bf16 applies to PyTorch formats (pytorch, torchscript, "
                "safetensors); convert ONNX models to fp16 or int8"
            )
        if config.precision is Precision.fp16:
            from kquant_job.passes.onnx_fp16 import OnnxFp16Pass

            return OnnxFp16Pass()
        if config.int8_mode is Int8Mode.dynamic:
            from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass

            return OnnxInt8DynamicPass()
        from kquant_job.passes.onnx_int8_static import OnnxInt8StaticPass

        return OnnxInt8StaticPass()
    if fmt in _TORCH_FLOAT and config.precision is not Precision.int8:
        import importlib

        module, cls = _TORCH_FLOAT[fmt]
        return getattr(importlib.import_module(module), cls)()
    if fmt is ModelFormat.torchscript and config.int8_mode is Int8Mode.dynamic:
        from kquant_job.passes.torch_int8_dynamic import TorchInt8DynamicPass

        return TorchInt8DynamicPass()
    if fmt in (ModelFormat.pytorch, ModelFormat.safetensors):
        raise _unsupported(
            f"int8 for a {fmt.value} file: it holds weights without the code that runs them, "
            "so there is nothing to quantize (INT8 needs the module: export it to ONNX or "
            "TorchScript, or convert this file to fp16/bf16)"
        )
    if fmt is ModelFormat.torchscript:
        raise _unsupported(
            "int8 static for TorchScript: not supported (int8 dynamic quantizes its Linear "
            "layers; for static INT8 export the model to ONNX)"
        )
    raise _unsupported(f"no {config.precision.value} pass for format {fmt.value}")
