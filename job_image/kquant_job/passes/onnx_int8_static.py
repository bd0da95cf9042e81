"""ONNX INT8 static quantization with onnxruntime's ``quantize_static``.

Activation ranges are fixed from calibration samples (local ``.npz`` files, one feed per
file, array names = model input names), so inference needs no run-time range computation.
Formats: QDQ (QuantizeLinear/DequantizeLinear pairs around float ops, the default and what
onnxruntime recommends for CPU and GPU since 1.11) or QOperator (QLinearConv...).

Limitation (onnxruntime's): static quantization does not reach If/Loop/Scan subgraphs (the
calibrator records main-graph tensors only; with ``EnableSubgraph`` the QOperator quantizer
crashes for lack of ranges), so weights inside subgraphs stay float. The pass says so in
its warnings; ``mode: dynamic`` quantizes them.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from onnx import ModelProto, helper

from kquant_api import (
    CalibrateMethod,
    ModelFormat,
    Precision,
    QuantFormat,
    QuantizationConfig,
    QuantType,
    Reason,
)
from kquant_api.spec import Preprocess
from kquant_job.errors import InvalidSpec, PassError
from kquant_job.passes.base import PassContext, PassResult
from kquant_job.passes.int8_attempts import run_attempts
from kquant_job.passes.int8_common import (
    WEIGHTED_OP_TYPES,
    Int8Settings,
    fallback_ladder,
    ort_quant_type,
    output_layers,
    quantizable_nodes,
    unknown_names,
)
from kquant_job.passes.int8_prepare import (
    op_types_in,
    prepare,
    weighted_nodes_in_subgraphs,
)
from kquant_job.passes.int8_slices import sliced_weight_quantization
from kquant_job.passes.onnx_common import default_opset
from kquant_job.passes.onnx_options import extra_options
from kquant_job.passes.onnx_refusals import refuse
from kquant_job.validate.inputs import load_feed

Signature = list[tuple[str, list[Any], np.dtype]]


def model_signature(model: ModelProto) -> Signature:
    """The model's real inputs (graph inputs that are not initializers) as
    ``(name, dims, numpy dtype)``; a dim is an int when fixed, else its name or None."""
    initializers = {t.name for t in model.graph.initializer}
    signature = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        ]
        signature.append(
            (value.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
        )
    return signature


def load_calibration_feed(path: Path, signature: Signature) -> dict[str, np.ndarray]:
    """One calibration feed from an ``.npz`` file, checked like validation data (see
    :func:`kquant_job.validate.inputs.load_feed`). Raises InvalidSpec naming the file."""
    return load_feed(path, signature, "calibration data")


class NpzCalibrationReader:
    """onnxruntime ``CalibrationDataReader`` over ``.npz`` files, read one at a time."""

    def __init__(self, files: list[Path], signature: Signature) -> None:
        self._files = iter(files)
        self._signature = signature

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next feed, or None when the files are exhausted."""
        path = next(self._files, None)
        return None if path is None else load_calibration_feed(path, self._signature)


class OnnxInt8StaticPass:
    """INT8 weights and activations with calibrated ranges (onnxruntime
    ``quantize_static``).

    Config: ``quantFormat`` (QDQ default, QOperator), ``activationType`` and ``weightType``
    (QInt8 default), ``calibration.calibrateMethod`` (MinMax, Entropy, Percentile) and
    ``calibration.samples`` (at most that many files, in name order), plus the shared
    ``perChannel``, ``reduceRange``, ``opTypesToQuantize``, ``nodesToExclude``. Same
    fallback ladder as the dynamic pass when ``ctx.probe`` is given, and the same timing of
    a candidate with INT8 Conv layers (QLinearConv ran 1.3-4.7x slower than FP32 on OCR and
    detection models: Conv is then left float, unless ``requireGain`` is false).
    """

    name: ClassVar[str] = "onnx-int8-static"
    formats: ClassVar[frozenset[ModelFormat]] = frozenset({ModelFormat.onnx})

    def run(
        self, model_in: Path, config: QuantizationConfig, out_path: Path, ctx: PassContext
    ) -> PassResult:
        """Calibrate on ``ctx.calibration_files`` and quantize ``model_in`` into
        ``out_path``.

        Details as the dynamic pass, plus ``quantFormat``, ``activationType`` and
        ``calibration`` {method, samples used, files available}. Raises InvalidSpec when
        there are no calibration files, a file does not fit the model's inputs, or the
        types are a combination onnxruntime refuses (QInt8 activations with QUInt8
        weights); PassError(CorruptModel) for an unreadable model; PassError(AlreadyQuantized)
        for a model that already holds quantized nodes; PassError
        (ConversionFailed) naming the file and onnxruntime's message when no candidate was
        produced and loaded.
        """
        from onnxruntime.quantization import CalibrationMethod, quantize_static
        from onnxruntime.quantization import QuantFormat as OrtQuantFormat
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        calibration = config.calibration
        method = calibration.calibrateMethod if calibration else CalibrateMethod.MinMax
        limit = calibration.samples if calibration else None
        files = sorted(ctx.calibration_files, key=lambda p: p.name)[:limit]
        if not files:
            raise InvalidSpec(
                f"static INT8 quantization of {model_in.name} needs calibration samples: "
                "spec.quantization.calibration.uri holds no .npz file"
            )
        activation = config.activationType or QuantType.QInt8
        settings = Int8Settings.from_config(config)
        if activation is QuantType.QInt8 and settings.weight_type is QuantType.QUInt8:
            raise InvalidSpec(
                "spec.quantization: activationType QInt8 with weightType QUInt8 is not "
                "supported by onnxruntime (use weightType QInt8)"
            )
        fmt = config.quantFormat or QuantFormat.QDQ
        supported = frozenset(QDQRegistry if fmt is QuantFormat.QDQ else QLinearOpsRegistry)

        options = extra_options(config)
        prepared = prepare(
            model_in, ctx.work_dir, config.preprocess or Preprocess.auto,
            check=lambda m: refuse(m, model_in.name, Precision.int8),
        )  # fmt: skip
        signature = model_signature(prepared.model)
        load_calibration_feed(files[0], signature)  # a wrong dataset fails before any work
        details: dict[str, Any] = {
            "mode": "static",
            **prepared.details,
            "quantFormat": fmt.value,
            "activationType": activation.value,
            "calibration": {
                "method": method.value,
                "samples": len(files),
                "available": len(ctx.calibration_files),
            },
            "warnings": unknown_names(prepared.model, settings, supported),
        }
        if options:
            details["extraOptions"] = options
        inner = weighted_nodes_in_subgraphs(prepared.model)
        if inner:
            listed = ", ".join(f"{n} {op}" for op, n in sorted(inner.items()))
            details["warnings"].append(
                f"{listed} inside If/Loop/Scan subgraphs stay float: onnxruntime's static "
                "quantization does not reach subgraphs (mode: dynamic does)"
            )
        if inner and not (set(op_types_in(prepared.model, include_subgraphs=False)) & supported):
            raise PassError(
                f"static INT8 cannot quantize {model_in.name}: all its weighted ops ({listed}) "
                "are inside If/Loop/Scan subgraphs, which onnxruntime's static quantization "
                "does not reach; use mode: dynamic",
                reason=Reason.ConversionFailed,
            )
        present = op_types_in(prepared.model, include_subgraphs=False)
        last = output_layers(prepared.model, set(WEIGHTED_OP_TYPES))
        per_channel = _per_channel_possible(prepared.model, fmt, model_in.name, settings)
        if not per_channel:
            details["warnings"].append(
                f"no per-channel attempt: {model_in.name} is opset {_opset(prepared.model)}"
                ", and a per-channel DequantizeLinear (its axis attribute) needs opset 13"
            )
        steps = fallback_ladder(settings, supported, present, last, per_channel)
        if config.strict:  # the requested configuration only
            steps = steps[:1]
        # Ranges depend on the data only: calibrate once, reuse them for later attempts.
        cache: dict[str, Any] = {}
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            cache["calibration_cache_path"] = ctx.work_dir / "calibration-ranges.json"
            cache["calibration_cache_path"].unlink(missing_ok=True)  # never an earlier run's

        def quantize(s: Int8Settings, out: Path) -> None:
            with sliced_weight_quantization():  # the same bytes, no whole-tensor temporaries
                quantize_static(
                    prepared.path,
                    out,
                    NpzCalibrationReader(files, signature),
                    quant_format=OrtQuantFormat[fmt.value],
                    activation_type=ort_quant_type(activation),
                    calibrate_method=CalibrationMethod[method.value],
                    use_external_data_format=prepared.external,
                    extra_options=dict(options),
                    **cache,
                    **s.ort_kwargs(),
                )

        nodes = (
            None
            if config.strict
            else quantizable_nodes(prepared.model, settings, supported, present, False)
        )
        # a slow INT8 Conv is not worth having: Conv is left float instead (gain rule)
        faster = None if config.requireGain is False else "denseOpsOnly"
        return run_attempts(
            self.name, model_in, steps, quantize, out_path, ctx, details, nodes, faster
        )


QDQ_PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis attribute (ONNX operator changelog)


def _opset(model: ModelProto) -> int:
    return default_opset(model) or 1  # an opset left unnamed is the first


def _per_channel_possible(
    model: ModelProto, fmt: QuantFormat, name: str, settings: Int8Settings
) -> bool:
    """Whether per-channel scales fit the model in ``fmt``: QDQ below opset 13 has no
    per-channel DequantizeLinear, and onnxruntime then writes a model that does not load
    (PP-OCR's opset 11 exports: every per-channel attempt failed to load). Raises
    PassError(ConversionFailed) when the spec asks for per-channel where it cannot be."""
    possible = fmt is not QuantFormat.QDQ or _opset(model) >= QDQ_PER_CHANNEL_OPSET
    if settings.per_channel and not possible:
        raise PassError(
            f"{name} is opset {_opset(model)}: per-channel QDQ needs opset "
            f"{QDQ_PER_CHANNEL_OPSET} (DequantizeLinear's axis); use perChannel: false, or "
            "quantFormat: QOperator",
            reason=Reason.ConversionFailed,
        )
    return possible
