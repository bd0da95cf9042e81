"""ONNX INT8 dynamic quantization with onnxruntime's ``quantize_dynamic``.

Weights are stored as 8-bit integers; activations are quantized at run time per batch
(``DynamicQuantizeLinear``, always uint8 in onnxruntime), so no calibration data is needed.
Conv becomes ConvInteger, MatMul (and Gemm) MatMulInteger, LSTM DynamicQuantizeLSTM.
Subgraphs (If/Loop/Scan bodies) are quantized too (``EnableSubgraph``), which is where
Silero VAD keeps all of its weights.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from kquant_api import ModelFormat, Precision, QuantizationConfig
from kquant_api.spec import Preprocess
from kquant_job.passes.base import PassContext, PassResult
from kquant_job.passes.int8_attempts import run_attempts
from kquant_job.passes.int8_common import (
    WEIGHTED_OP_TYPES,
    Int8Settings,
    fallback_ladder,
    output_layers,
    quantizable_nodes,
    unknown_names,
)
from kquant_job.passes.int8_prepare import (
    has_subgraphs,
    op_types_in,
    prepare,
    save_localized,
)
from kquant_job.passes.int8_shapes import light_shape_reload
from kquant_job.passes.int8_slices import sliced_weight_quantization
from kquant_job.passes.int8_weight_only import WEIGHT_ONLY_OP_TYPES, store_weights_int8
from kquant_job.passes.onnx_common import iter_nodes, load_model, save_model
from kquant_job.passes.onnx_options import extra_options
from kquant_job.passes.onnx_refusals import refuse


class OnnxInt8DynamicPass:
    """INT8 weights, activations quantized at run time (onnxruntime ``quantize_dynamic``).

    Config: ``weightType`` (default QInt8), ``perChannel``, ``reduceRange``,
    ``opTypesToQuantize``, ``nodesToExclude``. With ``ctx.probe`` a candidate that misses
    the tolerance is retried with per-channel weights, then with only MatMul/Gemm/LSTM/GRU/
    Attention quantized, then with the layers that produce the outputs left float too (see
    :func:`~kquant_job.passes.int8_common.fallback_ladder`). A candidate within tolerance
    whose ConvInteger makes it slower than the original goes on to the MatMul/Gemm/LSTM/GRU/
    Attention step too, unless ``requireGain`` is false
    (:func:`~kquant_job.passes.int8_attempts.run_attempts`). Conv layers left float by that
    step keep INT8 weights restored in float when the probe still passes (in a model with
    no such dense op, a ``convWeightsOnly`` step does only that:
    :mod:`kquant_job.passes.int8_weight_only`).
    """

    name: ClassVar[str] = "onnx-int8-dynamic"
    formats: ClassVar[frozenset[ModelFormat]] = frozenset({ModelFormat.onnx})

    def run(
        self, model_in: Path, config: QuantizationConfig, out_path: Path, ctx: PassContext
    ) -> PassResult:
        """Quantize ``model_in`` into ``out_path`` (external data, if any, beside it as
        ``<name>.data``).

        Details: pre-processing status, ``attempts``, ``quantizedNodes`` (+ per op type,
        inside subgraphs, int8 initializers), ``probePassed`` when a probe was given,
        ``warnings``. Raises PassError(CorruptModel) for an unreadable model,
        PassError(AlreadyQuantized) for a model that already holds quantized nodes,
        PassError(ConversionFailed) naming the file and onnxruntime's message when no
        candidate could be produced and loaded.
        """
        from onnxruntime.quantization import quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        # onnxruntime rewrites Gemm as MatMul before dynamic quantization.
        supported = frozenset(IntegerOpsRegistry) | {"Gemm"}
        options = extra_options(config)
        mode = config.preprocess or Preprocess.auto
        prepared = prepare(
            model_in, ctx.work_dir, mode, dynamic=True,
            check=lambda m: refuse(m, model_in.name, Precision.int8),
        )  # fmt: skip
        details: dict[str, Any] = {"mode": "dynamic", **prepared.details}
        if options:
            details["extraOptions"] = dict(options)
        if has_subgraphs(prepared.model):
            options.setdefault("EnableSubgraph", True)
            details["subgraphs"] = True
            moved = save_localized(prepared, ctx.work_dir)
            if moved:
                details["initializersMovedIntoSubgraphs"] = moved
        settings = Int8Settings.from_config(config)
        details["warnings"] = unknown_names(prepared.model, settings, supported)
        present = op_types_in(prepared.model)
        last = output_layers(prepared.model, set(WEIGHTED_OP_TYPES))
        # Conv left float keeps INT8 weights (not with external data: held by no one inline)
        stored = () if prepared.external else WEIGHT_ONLY_OP_TYPES
        steps = fallback_ladder(settings, supported, present, last, weight_only=stored)
        if config.strict:  # the requested configuration only
            steps = steps[:1]

        gemms = {n.name for _, n in iter_nodes(prepared.model.graph) if n.op_type == "Gemm"}

        def quantize(s: Int8Settings, out: Path) -> None:
            if s.integer_ops:
                integer(s, out)
            else:
                shutil.copyfile(prepared.path, out)
            if s.weight_only:
                model = load_model(out)
                layers = store_weights_int8(model, s.weight_only, s.nodes_to_exclude)
                if layers:
                    save_model(model, out)

        def integer(s: Int8Settings, out: Path) -> None:
            kwargs = s.ort_kwargs()
            types = kwargs["op_types_to_quantize"]
            if types and "Gemm" in types and "MatMul" not in types:
                types.append("MatMul")  # what Gemm has become by the time ops are matched
            for key in ("nodes_to_exclude", "nodes_to_quantize"):
                if kwargs[key]:  # a Gemm named X is matched as the MatMul X_MatMul
                    kwargs[key] += [f"{n}_MatMul" for n in kwargs[key] if n in gemms]
            # the same result without a reload of every weight, nor whole-tensor temporaries
            with light_shape_reload(), sliced_weight_quantization(), _no_preprocess_advice():
                quantize_dynamic(
                    prepared.path,
                    out,
                    use_external_data_format=prepared.external,
                    extra_options=dict(options),
                    **kwargs,
                )

        nodes = (
            None
            if config.strict
            else quantizable_nodes(prepared.model, settings, supported, present)
        )
        # a slow ConvInteger is not worth having: Conv is left float instead (gain rule)
        labels = [label for label, _ in steps]
        faster = next((f for f in ("denseOpsOnly", "convWeightsOnly") if f in labels), None)
        if config.requireGain is False:
            faster = None
        return run_attempts(
            self.name, model_in, steps, quantize, out_path, ctx, details, nodes, faster,
            tuple(t for t in stored if t in present) if not config.strict else (),
        )  # fmt: skip


@contextmanager
def _no_preprocess_advice() -> Iterator[None]:
    """Drop onnxruntime's "Please consider to run pre-processing" warning (logged on the
    root logger by ``quantize_dynamic`` when the model lacks its pre-processing metadata):
    kquant decided on pre-processing and the report's ``preprocess`` says why."""

    def advice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")

    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
