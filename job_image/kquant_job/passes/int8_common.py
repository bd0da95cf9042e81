"""What the ONNX INT8 passes (dynamic and static) share: the parameter group mapped to
onnxruntime's terms and the fallback ladder. Pre-processing and model inspection are in
:mod:`kquant_job.passes.int8_prepare`, the attempt loop that runs the ladder in
:mod:`kquant_job.passes.int8_attempts`.

Quantization itself is onnxruntime's (``onnxruntime.quantization``); this module only
prepares its input, picks its options and checks its output. Recipe references:
https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from onnx import ModelProto

from kquant_api import QuantizationConfig, QuantType
from kquant_job.passes.onnx_common import (
    iter_nodes,
)

# Op types whose weights onnxruntime quantizes and that tolerate it best; the last fallback
# keeps everything else (Conv above all) in float.
DENSE_OP_TYPES = ("MatMul", "Gemm", "LSTM", "GRU", "Attention")
# Ops that hold a weight; used to say what stays float inside subgraphs in static mode.
WEIGHTED_OP_TYPES = frozenset({"Conv", "ConvTranspose", *DENSE_OP_TYPES})


def ort_quant_type(value: QuantType | None) -> Any:
    """onnxruntime's ``QuantType`` for ours (None -> QInt8)."""
    from onnxruntime.quantization import QuantType as OrtQuantType

    return OrtQuantType[(value or QuantType.QInt8).value]


# x86 CPU flags (/proc/cpuinfo) of the integer dot-product instructions onnxruntime's INT8
# kernels use, best first.
_INT8_FLAGS = (("amx_int8", "amx"), ("avx512_vnni", "vnni"), ("avx_vnni", "vnni"))


def cpu_int8_kernels(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Which integer dot products onnxruntime's CPU INT8 kernels get on this machine:
    ``amx``, ``vnni`` (AVX512-VNNI or AVX-VNNI), ``avx2`` (no VNNI: u8 x s8 products are
    summed in saturating 16-bit pairs, ``vpmaddubsw``, so INT8 error measured here can exceed
    what a VNNI CPU or a GPU gives on the same model; onnxruntime's quantization guide
    recommends ``reduceRange`` there) or ``other`` (not x86, or flags unreadable).

    Recorded in the INT8 report: validation on the CPU provider measures this machine's
    kernels. Never raises."""
    try:
        flags = set(cpuinfo.read_text(errors="replace").split())
    except OSError:
        return "other"
    for flag, name in _INT8_FLAGS:
        if flag in flags:
            return name
    return "avx2" if "avx2" in flags else "other"


def describe_error(exc: BaseException, limit: int = 500) -> str:
    """``"Type: message"`` for a report; an empty message (a bare ``assert`` inside
    onnxruntime) is replaced by where it was raised."""
    msg = " ".join(str(exc).split())
    if not msg:
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            last = frames[-1]
            msg = f"raised at {Path(last.filename).name}:{last.lineno} in {last.name}"
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Int8Settings:
    """The parameter group that static and dynamic INT8 share, in onnxruntime's terms.

    ``op_types`` empty means every op type onnxruntime can quantize in that mode;
    ``nodes_to_quantize`` empty means every node not excluded (set only while ranking nodes,
    see :mod:`kquant_job.passes.int8_recovery`). ``weight_only``: op types left float whose
    weights are then stored INT8 (:mod:`kquant_job.passes.int8_weight_only`, dynamic only);
    ``integer_ops`` False: no onnxruntime quantization at all, only that.
    """

    weight_type: QuantType = QuantType.QInt8
    per_channel: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] = ()
    nodes_to_exclude: tuple[str, ...] = ()
    nodes_to_quantize: tuple[str, ...] = ()
    weight_only: tuple[str, ...] = ()
    integer_ops: bool = True

    @classmethod
    def from_config(cls, config: QuantizationConfig) -> Int8Settings:
        """Defaults: QInt8 weights (QUInt8 weights are several times slower on x86 CPUs),
        per-tensor scales, full 8-bit range, every supported op type, no node excluded."""
        return cls(
            weight_type=config.weightType or QuantType.QInt8,
            per_channel=bool(config.perChannel),
            reduce_range=bool(config.reduceRange),
            op_types=tuple(config.opTypesToQuantize or ()),
            nodes_to_exclude=tuple(config.nodesToExclude or ()),
        )

    def ort_kwargs(self) -> dict[str, Any]:
        """Keyword arguments common to ``quantize_dynamic`` and ``quantize_static``."""
        return {
            "weight_type": ort_quant_type(self.weight_type),
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "op_types_to_quantize": list(self.op_types) or None,
            "nodes_to_exclude": list(self.nodes_to_exclude) or None,
            "nodes_to_quantize": list(self.nodes_to_quantize) or None,
        }

    def describe(self) -> dict[str, Any]:
        """The settings as recorded in report.json (camelCase, like the spec)."""
        return {
            "weightType": self.weight_type.value,
            "perChannel": self.per_channel,
            "reduceRange": self.reduce_range,
            "opTypesToQuantize": list(self.op_types),
            "nodesToExclude": list(self.nodes_to_exclude),
            **({"nodesToQuantize": list(self.nodes_to_quantize)} if self.nodes_to_quantize else {}),
            **({"weightOnlyOpTypes": list(self.weight_only)} if self.weight_only else {}),
            **({} if self.integer_ops else {"integerOps": False}),
        }


def fallback_ladder(
    base: Int8Settings,
    supported: frozenset[str],
    present: set[str],
    output_layers: tuple[str, ...] = (),
    per_channel: bool = True,
    weight_only: tuple[str, ...] = (),
) -> list[tuple[str, Int8Settings]]:
    """The settings to try in order when a probe is given: as requested; then per-channel
    weight scales (if not asked already); then only the dense op types (MatMul, Gemm, LSTM,
    GRU, Attention) kept quantized and the rest (typically Conv) left float, if that changes
    anything; then ``output_layers`` (the weighted nodes that produce the model's outputs,
    see :func:`output_layers`) left float too, if any is not excluded already. Keeping the
    output layer (logits, a classifier) float is the usual mixed-precision remedy: its
    rounding error reaches the outputs with nothing after it to average it out (measured on
    the corpus' Whisper-style decoder, tied-embedding logits: static QDQ mean abs error
    0.076 with every MatMul INT8, 0.02 with the logits MatMul float). ``supported``: op
    types the quantizer handles; ``present``: op types in the model. Each step keeps the
    previous step's changes. ``per_channel`` False: the model cannot take per-channel
    scales in this format (no perChannel step). ``weight_only``: op types (Conv) whose
    weights may be stored INT8 while they compute in float: in a model with no dense op, a
    ``convWeightsOnly`` step does only that (INT8 dynamic: see
    :mod:`kquant_job.passes.int8_weight_only`; elsewhere
    :func:`~kquant_job.passes.int8_attempts.run_attempts` tries it on the passing step)."""
    steps = [("requested", base)]
    if not base.per_channel and per_channel:
        steps.append(("perChannel", replace(steps[-1][1], per_channel=True)))
    effective = (set(base.op_types) or set(supported)) & present
    dense = tuple(t for t in DENSE_OP_TYPES if t in effective)
    stored = tuple(t for t in weight_only if t in effective)
    if dense and set(dense) != effective:
        steps.append(("denseOpsOnly", replace(steps[-1][1], op_types=dense)))
    elif not dense and stored:
        only = replace(steps[-1][1], weight_only=stored, integer_ops=False)
        steps.append(("convWeightsOnly", only))
    excluded = steps[-1][1].nodes_to_exclude
    extra = tuple(n for n in output_layers if n not in excluded)
    if extra:
        steps.append(
            ("outputLayersFloat", replace(steps[-1][1], nodes_to_exclude=excluded + extra))
        )
    return steps


def output_layers(model: ModelProto, op_types: set[str], depth: int = 4) -> tuple[str, ...]:
    """Main-graph nodes of ``op_types`` (weighted ops) that produce a graph output, directly
    or through at most ``depth`` weight-free nodes (bias Add, Reshape, Transpose, Softmax...).
    Empty when they would be every node of ``op_types`` (nothing would stay quantized)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name for t in model.graph.initializer}
    found: list[str] = []
    frontier = [o.name for o in model.graph.output]
    for _ in range(depth + 1):
        upstream = []
        for tensor in frontier:
            node = producer.get(tensor)
            if node is None:
                continue
            if node.op_type in op_types:
                found.append(node.name)
            else:
                upstream += [i for i in node.input if i and i not in initializers]
        frontier = upstream
    found = list(dict.fromkeys(found))
    weighted = [n.name for n in model.graph.node if n.op_type in op_types]
    return () if set(found) >= set(weighted) else tuple(found)


def quantizable_nodes(
    model: ModelProto,
    settings: Int8Settings,
    supported: frozenset[str],
    present: set[str],
    include_subgraphs: bool = True,
) -> list[str]:
    """Names of the weighted nodes (Conv, MatMul, Gemm, LSTM...) that ``settings`` would
    quantize, in graph order (subgraphs too, unless ``include_subgraphs`` is false: static
    quantization does not reach them): the nodes accuracy recovery ranks. Unnamed nodes
    cannot be excluded by name and are left out."""
    effective = (set(settings.op_types) or set(supported)) & present & WEIGHTED_OP_TYPES
    graph = model.graph
    pairs = iter_nodes(graph) if include_subgraphs else ((graph, n) for n in graph.node)
    names = [
        node.name
        for _, node in pairs
        if node.op_type in effective and node.name and node.name not in settings.nodes_to_exclude
    ]
    return list(dict.fromkeys(names))


def unknown_names(
    model: ModelProto, settings: Int8Settings, supported: frozenset[str]
) -> list[str]:
    """Warnings for ``nodesToExclude`` names no node has and ``opTypesToQuantize`` entries
    the quantizer does not handle (both would silently do nothing)."""
    names = {node.name for _, node in iter_nodes(model.graph)}
    warnings = [
        f"nodesToExclude: no node named {n!r} in the model"
        for n in settings.nodes_to_exclude
        if n not in names
    ]
    warnings += [
        f"opTypesToQuantize: onnxruntime does not quantize {t!r} in this mode"
        for t in settings.op_types
        if t not in supported
    ]
    return warnings
