"""ONNX INT4 weight-only quantization with onnxruntime's ``MatMulNBitsQuantizer``.

Each MatMul whose second input is a constant 2-D weight becomes a ``MatMulNBits`` contrib
node holding 4-bit weights in blocks of ``blockSize`` values along the reduction axis, one
scale (and, asymmetric, one zero point) per block; activations and every other op stay float.
This is the recipe of onnxruntime's transformer tools and of transformers.js's ``q4`` and
``q4f16`` variants (``q4f16``: the model converted to FP16 first, then its MatMul weights to
4 bits). Algorithms: ``rtn`` (round to nearest per block, onnxruntime's default
``DefaultWeightOnlyQuantConfig``) and ``hqq`` (Half-Quadratic Quantization, which optimizes
each block's scale and zero point; https://mobiusml.github.io/hqq_blog/). Neither needs
calibration data.

It applies to transformer-style models (projections, attention, feed-forward MatMuls);
convolutional and recurrent weights (Conv, LSTM, GRU) have no 4-bit kernel here, so a model
without a MatMul on a constant weight is refused with the reason.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

from onnx import ModelProto

from kquant_api import ModelFormat, Precision, QuantizationConfig, Reason
from kquant_job.errors import PassError
from kquant_job.passes.base import PassContext, PassResult
from kquant_job.passes.int8_attempts import load_error
from kquant_job.passes.onnx_common import iter_nodes, load_model, save_model
from kquant_job.passes.onnx_refusals import refuse, weighted_matmuls

LOG = logging.getLogger("kquant.pass")
DEFAULT_BLOCK_SIZE = 32  # transformers.js's q4 recipe; onnxruntime's tool defaults to 128


class OnnxInt4Pass:
    """INT4 weight-only (MatMulNBits): ``blockSize`` (default 32), ``symmetric`` (default
    true), ``accuracyLevel`` (MatMulNBits' compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16,
    4 int8), ``algorithm`` rtn (default) or hqq, ``floatPrecision`` fp32 (``q4``, default)
    or fp16 (``q4f16``: the FP16 pass first, with its block lists and repair)."""

    name: ClassVar[str] = "onnx-int4-weight-only"
    formats: ClassVar[frozenset[ModelFormat]] = frozenset({ModelFormat.onnx})

    def run(
        self, model_in: Path, config: QuantizationConfig, out_path: Path, ctx: PassContext
    ) -> PassResult:
        """Quantize ``model_in``'s MatMul weights to 4 bits into ``out_path``.

        Details: ``algorithm``, ``blockSize``, ``symmetric``, ``accuracyLevel``,
        ``floatPrecision``, ``matmulNBits`` (nodes replaced) of ``candidates`` (MatMuls on
        constant weights), ``fp16`` (the FP16 pass's details, q4f16), ``probePassed``.
        Raises PassError(AlreadyQuantized) for a quantized model, PassError
        (ConversionFailed) when the model has no MatMul on a constant 2-D weight, or when
        onnxruntime cannot quantize or load the result (its message quoted)."""
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            HQQWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        model = load_model(model_in)
        refuse(model, model_in.name, Precision.int4)
        candidates = weighted_matmuls(model)
        block = config.blockSize or DEFAULT_BLOCK_SIZE
        symmetric = config.symmetric is not False
        algorithm = (config.algorithm or "rtn").lower()
        fp16 = config.floatPrecision == "fp16"
        details: dict[str, Any] = {
            "algorithm": algorithm,
            "blockSize": block,
            "symmetric": symmetric,
            "accuracyLevel": config.accuracyLevel,
            "floatPrecision": "fp16" if fp16 else "fp32",
            "candidates": len(candidates),
        }
        if fp16:
            model, details["fp16"] = self._fp16_first(model_in, config, ctx)
        if algorithm == "hqq":
            algo: Any = HQQWeightOnlyQuantConfig(block_size=block, bits=4)
        else:
            algo = DefaultWeightOnlyQuantConfig(
                block_size=block,
                is_symmetric=symmetric,
                accuracy_level=config.accuracyLevel,
                op_types_to_quantize=("MatMul",),
            )
        candidate = ctx.work_dir / "int4" / out_path.name
        candidate.parent.mkdir(parents=True, exist_ok=True)
        try:
            quantizer = MatMulNBitsQuantizer(
                model,
                block_size=block,
                is_symmetric=symmetric,
                accuracy_level=config.accuracyLevel,
                algo_config=algo,
            )
            quantizer.process()
            save_model(quantizer.model.model, candidate)
        except PassError:
            raise
        except Exception as exc:
            raise PassError(
                f"onnxruntime could not quantize {model_in.name} to int4: "
                f"{type(exc).__name__}: {exc}"[:600],
                reason=Reason.ConversionFailed,
            ) from None
        result = load_model(candidate, load_external_data=False)
        replaced = sum(n.op_type == "MatMulNBits" for _, n in iter_nodes(result.graph))
        details["matmulNBits"] = replaced
        if replaced == 0:
            raise PassError(
                f"int4: onnxruntime replaced none of the {len(candidates)} MatMul(s) of "
                f"{model_in.name} (a weight's reduction axis shorter than blockSize {block}?)",
                reason=Reason.ConversionFailed,
            )
        failure = load_error(candidate)
        if failure:
            raise PassError(
                f"onnxruntime cannot load the int4 {model_in.name}: {failure}",
                reason=Reason.ConversionFailed,
            )
        if ctx.probe is not None:
            probe = ctx.probe(candidate)
            details["probePassed"] = probe.ok
            details["probe"] = {"ok": probe.ok, "violations": probe.violations}
        _move(candidate, out_path)
        return PassResult(output=out_path, details=details)

    @staticmethod
    def _fp16_first(
        model_in: Path, config: QuantizationConfig, ctx: PassContext
    ) -> tuple[ModelProto, dict[str, Any]]:
        """q4f16's first half: the FP16 pass (keepIoTypes, default block lists, repair)."""
        from kquant_job.passes.onnx_fp16 import OnnxFp16Pass

        half = QuantizationConfig(precision="fp16", strict=config.strict)
        work = ctx.work_dir / "fp16"
        work.mkdir(parents=True, exist_ok=True)
        own = PassContext(work_dir=work, probe=ctx.probe,
                          activation_ranges=ctx.activation_ranges, log=ctx.log)  # fmt: skip
        done = OnnxFp16Pass().run(model_in, half, work / model_in.name, own)
        return load_model(done.output), done.details


def _move(candidate: Path, out_path: Path) -> None:
    """The candidate (and its data file) to ``out_path``, never half-written there."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = candidate.with_name(candidate.name + ".data")
    if data.exists():
        shutil.move(str(data), str(out_path.with_name(out_path.name + ".data")))
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    shutil.move(str(candidate), str(tmp))
    os.replace(tmp, out_path)
