"""What the ONNX INT8 passes (dynamic and static) share: the parameter group mapped to
onnxruntime's terms, the fallback ladder, pre-processing and model inspection. The attempt
loop that runs the ladder is in :mod:`kquant_job.passes.int8_attempts`.

Quantization itself is onnxruntime's (``onnxruntime.quantization``); this module only
prepares its input, picks its options and checks its output. Recipe references:
https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html
"""

from __future__ import annotations

import logging
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from onnx import ModelProto, TensorProto

from kquant_api import QuantizationConfig, QuantType
from kquant_job.passes.onnx_common import (
    PROTOBUF_LIMIT,
    data_file_for,
    inner_nodes,
    iter_graphs,
    iter_nodes,
    load_model,
    save_model,
    subgraphs,
    working_directory,
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

    ``op_types`` empty means every op type onnxruntime can quantize in that mode.
    """

    weight_type: QuantType = QuantType.QInt8
    per_channel: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] = ()
    nodes_to_exclude: tuple[str, ...] = ()

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
        }

    def describe(self) -> dict[str, Any]:
        """The settings as recorded in report.json (camelCase, like the spec)."""
        return {
            "weightType": self.weight_type.value,
            "perChannel": self.per_channel,
            "reduceRange": self.reduce_range,
            "opTypesToQuantize": list(self.op_types),
            "nodesToExclude": list(self.nodes_to_exclude),
        }


def fallback_ladder(
    base: Int8Settings,
    supported: frozenset[str],
    present: set[str],
    output_layers: tuple[str, ...] = (),
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
    previous step's changes."""
    steps = [("requested", base)]
    if not base.per_channel:
        steps.append(("perChannel", replace(steps[-1][1], per_channel=True)))
    effective = (set(base.op_types) or set(supported)) & present
    dense = tuple(t for t in DENSE_OP_TYPES if t in effective)
    if dense and set(dense) != effective:
        steps.append(("denseOpsOnly", replace(steps[-1][1], op_types=dense)))
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


def op_types_in(model: ModelProto, *, include_subgraphs: bool = True) -> set[str]:
    """Op types used by the model's nodes (the main graph only, or every graph)."""
    if include_subgraphs:
        return {node.op_type for _, node in iter_nodes(model.graph)}
    return {node.op_type for node in model.graph.node}


def has_subgraphs(model: ModelProto) -> bool:
    """True when a node (If, Loop, Scan...) holds a graph attribute."""
    return any(True for node in model.graph.node for _ in subgraphs(node))


def weighted_nodes_in_subgraphs(model: ModelProto) -> Counter[str]:
    """Op type -> count of weight-holding nodes inside subgraphs (not the main graph)."""
    return Counter(
        inner.op_type
        for node in model.graph.node
        for inner in inner_nodes(node)
        if inner.op_type in WEIGHTED_OP_TYPES
    )


def uses_external_data(model: ModelProto) -> bool:
    """True when a tensor of any graph is stored in an external data file."""
    return any(
        t.data_location == TensorProto.EXTERNAL
        for g in iter_graphs(model.graph)
        for t in g.initializer
    )


def localize_subgraph_initializers(model: ModelProto) -> int:
    """Move each main-graph initializer that only one subgraph uses into that subgraph.

    Why: onnxruntime's dynamic quantizer looks up a subgraph Conv's weight in the subgraph's
    own initializers and raises "Expected ... to be an initializer" for weights held by the
    enclosing graph (Silero VAD's op18 "ifless" export). Moving them is semantics-neutral.
    Initializers that are graph inputs or used in several graphs stay. Returns how many
    moved.
    """
    graphs: dict[str, Any] = {}

    def walk(graph: Any, key: str) -> None:
        graphs[key] = graph
        for i, node in enumerate(graph.node):
            for j, sub in enumerate(subgraphs(node)):
                walk(sub, f"{key}/{i}.{j}")

    walk(model.graph, "")
    users: dict[str, set[str]] = {}
    for key, graph in graphs.items():
        for node in graph.node:
            for name in node.input:
                users.setdefault(name, set()).add(key)
        for out in graph.output:
            users.setdefault(out.name, set()).add(key)
    inputs = {i.name for i in model.graph.input}
    keep, moved = [], 0
    for init in model.graph.initializer:
        where = users.get(init.name, set())
        if len(where) == 1 and "" not in where and init.name not in inputs:
            graphs[next(iter(where))].initializer.append(init)
            moved += 1
        else:
            keep.append(init)
    if moved:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return moved


@contextmanager
def _captured_errors(logger_name: str) -> Iterator[list[str]]:
    """Collect ERROR records of a logger (quant_pre_process logs, and swallows, a failed
    graph optimization)."""
    records: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = _Handler(level=logging.ERROR)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def preprocess(model_in: Path, work_dir: Path, external: bool) -> tuple[Path, dict[str, Any]]:
    """Run onnxruntime's ``quant_pre_process`` (symbolic shape inference, graph optimization
    that also turns Constant nodes into initializers, ONNX shape inference) into
    ``work_dir/preprocessed.onnx``.

    When it raises, it is retried without symbolic shape inference (which fails on If
    branches without typed outputs, e.g. Silero VAD); when that raises too, the raw model is
    used. Returns the model to quantize and details: ``preprocess`` "applied" | "skipped",
    plus ``preprocessSkipped`` (steps left out) and ``preprocessError`` when something failed.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = work_dir / "preprocessed.onnx"
    extra: dict[str, Any] = {}
    if external:
        extra = dict(
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            external_data_location=data_file_for(out).name,
        )
    errors: list[str] = []
    for skip_symbolic in (False, True):
        data_file_for(out).unlink(missing_ok=True)  # onnx appends to an existing data file
        with (
            _captured_errors("onnxruntime.quantization.shape_inference") as logged,
            working_directory(out.parent),
        ):
            try:
                quant_pre_process(
                    str(model_in), str(out), skip_symbolic_shape=skip_symbolic, **extra
                )
            except Exception as exc:
                errors.append(describe_error(exc))
                continue
        details: dict[str, Any] = {"preprocess": "applied"}
        skipped = ["symbolicShapeInference"] if skip_symbolic else []
        if logged:  # "ONNX Runtime Model Optimization Failed!" followed by the traceback
            skipped.append("graphOptimization")
            errors.append(logged[-1].strip().splitlines()[-1][:500])
        if skipped:
            details["preprocessSkipped"] = skipped
        if errors:
            details["preprocessError"] = "; ".join(errors)
        return out, details
    return model_in, {"preprocess": "skipped", "preprocessError": "; ".join(dict.fromkeys(errors))}


@dataclass
class Prepared:
    """The model to quantize: its path, its graph (external data not loaded), whether it
    must be written with external data, and the pre-processing details."""

    path: Path
    model: ModelProto
    external: bool
    details: dict[str, Any]


def prepare(model_in: Path, work_dir: Path) -> Prepared:
    """Read ``model_in`` (PassError CorruptModel when it is not an ONNX model) and
    pre-process it. External data is used for the output when the input has external data
    or is at least 2 GiB (protobuf's limit)."""
    original = load_model(model_in, load_external_data=False)
    external = uses_external_data(original) or model_in.stat().st_size >= PROTOBUF_LIMIT
    work_dir.mkdir(parents=True, exist_ok=True)
    path, details = preprocess(model_in, work_dir, external)
    model = load_model(path, load_external_data=False) if path != model_in else original
    return Prepared(path=path, model=model, external=external, details=details)


def save_localized(prepared: Prepared, work_dir: Path) -> int:
    """Apply :func:`localize_subgraph_initializers` to the prepared model (loaded with its
    data) and point ``prepared.path`` at the rewritten copy; returns how many moved."""
    model = load_model(prepared.path)
    moved = localize_subgraph_initializers(model)
    if moved:
        path = work_dir / "localized.onnx"
        save_model(model, path)
        prepared.path = path
        prepared.model = load_model(path, load_external_data=False)
    return moved
