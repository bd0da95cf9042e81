"""INT8 dynamic quantization of a TorchScript module, with PyTorch's own quantizer.

PyTorch quantizes dynamically in two ways: ``torch.ao.quantization.quantize_dynamic`` swaps
``nn.Linear``/``nn.LSTM``/``nn.GRU`` submodules of an eager ``nn.Module`` (it needs the
module's Python classes), and ``quantize_dynamic_jit`` rewrites a scripted or traced module's
graph (``aten::linear`` -> ``quantized::linear_dynamic``). A serialized artifact is never an
eager module here: a pickled ``nn.Module`` is refused as unsafe (``weights_only=True``), and
TorchScript carries code but no Python classes. So the pass uses ``quantize_dynamic_jit``:
**Linear layers only**; LSTM/GRU stay float (the report says so).

CPU only: ``quantized::linear_dynamic`` has kernels for the CPU quantization engines (fbgemm/
x86, qnnpack/ARM) alone, and the weights are packed for the engine of the machine that
converts (recorded in the report). Validation of the result runs on the CPU.

A bare state dict holds weights without the code that runs them: no pass can quantize it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar

from kquant_api import ModelFormat, QuantizationConfig, QuantType, Reason
from kquant_job.errors import PassError
from kquant_job.passes.base import PassContext, PassResult
from kquant_job.passes.torch_common import require_torch
from kquant_job.passes.torch_script import load_script, save_script

# ONNX-only knobs this pass cannot honour: listed in the report when set.
_IGNORED = ("reduceRange", "opTypesToQuantize", "nodesToExclude")


def _count(module: Any, kind: str) -> int:
    return len(module.inlined_graph.findAllNodes(kind))


class TorchInt8DynamicPass:
    """INT8 dynamic quantization of a TorchScript module's Linear layers (CPU only)."""

    name: ClassVar[str] = "torch-int8-dynamic"
    formats: ClassVar[frozenset[ModelFormat]] = frozenset({ModelFormat.torchscript})

    def run(
        self, model_in: Path, config: QuantizationConfig, out_path: Path, ctx: PassContext
    ) -> PassResult:
        """Write the quantized module to ``out_path`` (``torch.jit.save``).

        ``perChannel`` picks per-channel weight scales. Raises PassError(UnsupportedFormat)
        for ``weightType: QUInt8`` (PyTorch's dynamic kernels take signed INT8 weights) or a
        module without Linear layers, PassError(ConversionFailed) when PyTorch's quantizer
        fails on the graph, PassError(CorruptModel) when the archive does not load.
        """
        torch = require_torch()
        from torch.ao.quantization import (
            default_dynamic_qconfig,
            per_channel_dynamic_qconfig,
            quantize_dynamic_jit,
        )

        if config.weightType is QuantType.QUInt8:
            raise PassError(
                "spec.quantization.weightType: QUInt8 is not available for PyTorch dynamic "
                "quantization (its kernels take QInt8 weights)",
                reason=Reason.UnsupportedFormat,
            )
        module = load_script(model_in, model_in.name)
        linear = _count(module, "aten::linear")
        if linear == 0:
            raise PassError(
                f"{model_in.name}: no Linear layer to quantize (PyTorch's graph-mode dynamic "
                "quantization converts aten::linear only; LSTM/GRU need the eager module)",
                reason=Reason.UnsupportedFormat,
            )
        qconfig = per_channel_dynamic_qconfig if config.perChannel else default_dynamic_qconfig
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
                quantized = quantize_dynamic_jit(module, {"": qconfig})
            done = _count(quantized, "quantized::linear_dynamic")
            save_script(quantized, out_path)
        except Exception as exc:
            message = " ".join(str(exc).split())[:300]
            raise PassError(
                f"{model_in.name}: PyTorch's dynamic quantization failed on this graph: {message}",
                reason=Reason.ConversionFailed,
            ) from None
        if done == 0:
            raise PassError(
                f"{model_in.name}: PyTorch's dynamic quantization left all {linear} Linear "
                "layers in float; nothing to publish as INT8",
                reason=Reason.ConversionFailed,
            )
        ignored = [f for f in _IGNORED if getattr(config, f)]
        details = {
            "method": "torch.ao.quantization.quantize_dynamic_jit",
            "engine": torch.backends.quantized.engine,
            "device": "cpu",
            "perChannel": bool(config.perChannel),
            "linearQuantized": done,
            "linearTotal": linear,
            "notQuantized": "LSTM/GRU and every non-Linear op stay float",
            "ignoredSettings": ignored,
        }
        ctx.log.info("quantized %d of %d Linear layers of %s", done, linear, model_in.name)
        return PassResult(out_path, details)
