"""Input preparation for the ONNX INT8 passes: model inspection (op types, subgraphs,
external data), onnxruntime's pre-processing (``quant_pre_process``: shape inference and
graph optimization) and the localization of subgraph initializers onnxruntime's quantizer
needs. Recipe reference:
https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html#pre-processing
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnx import GraphProto, ModelProto, TensorProto

from kquant_api import Reason
from kquant_api.spec import Preprocess
from kquant_job.errors import PassError
from kquant_job.passes.int8_common import WEIGHTED_OP_TYPES, describe_error
from kquant_job.passes.int8_optimize import optimize_external
from kquant_job.passes.int8_prep_need import dynamic_unaffected
from kquant_job.passes.int8_shapes import verified_onnxruntime
from kquant_job.passes.onnx_common import (
    PROTOBUF_LIMIT,
    data_file_for,
    default_opset,
    inner_nodes,
    iter_graphs,
    iter_nodes,
    load_model,
    save_model,
    subgraphs,
    working_directory,
)


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
    used. A model with external data whose symbolic inference fails is optimized on files
    (:func:`~kquant_job.passes.int8_optimize.optimize_external`: the same model without its
    weights in Python). Returns the model to quantize and details: ``preprocess`` "applied" |
    "skipped", plus ``preprocessSkipped`` (steps left out) and ``preprocessError`` when
    something failed.
    """
    quant_pre_process = import_quant_pre_process()
    out = work_dir / "preprocessed.onnx"
    extra: dict[str, Any] = {}
    if external:
        extra = dict(
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            external_data_location=data_file_for(out).name,
        )
    errors: list[str] = []
    attempts = (False, True)
    if external and (failure := _symbolic_failure(model_in, work_dir)):
        errors.append(failure)  # as the full attempt would fail, without loading the weights
        attempts = (True,)
    if attempts == (True,) and verified_onnxruntime():
        try:  # the same steps on files, weights never loaded (int8_optimize)
            optimize_external(model_in, out)
            details = {"preprocess": "applied", "preprocessSkipped": ["symbolicShapeInference"]}
            return out, {**details, "preprocessError": "; ".join(errors)}
        except Exception:  # the library's own path below reports what fails
            pass
    for skip_symbolic in attempts:
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


def _symbolic_failure(model_in: Path, scratch: Path) -> str | None:
    """The error onnxruntime's symbolic shape inference raises on ``model_in``'s graph, run
    as ``quant_pre_process`` runs it, or None when it succeeds. The weights stay in their
    data file: shapes do not depend on them, and a failed full attempt first loads them all
    (1.9 s of a BERT-base job whose inference fails, against 0.03 s here). None as well for
    opset 10 and below, which ``quant_pre_process`` converts before inferring. What the
    inference writes into the current directory goes to a folder in ``scratch``, removed."""
    import onnx

    model = onnx.load(str(model_in), load_external_data=False)
    opset = default_opset(model)
    if opset is not None and opset <= 10:
        return None
    import_quant_pre_process()  # onnxruntime.tools without torch
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:  # the arguments are quant_pre_process's defaults
        # on failure it saves its partial model into the current directory: a scratch one
        with working_directory(scratch):
            SymbolicShapeInference.infer_shapes(model, 2**31 - 1, False, False, 0)
    except Exception as exc:
        return describe_error(exc)
    return None


def import_quant_pre_process() -> Any:
    """onnxruntime's ``quant_pre_process``, imported without torch when torch is not loaded
    yet. ``onnxruntime.tools/__init__.py`` imports its PyTorch export helpers whenever torch
    is installed (the worker image has it for .pt models), which cost an ONNX INT8 job 1.6 s
    and torch's memory for nothing; ``find_spec`` reports a module set to None in
    ``sys.modules`` as absent, so the helpers are skipped. The entry is removed afterwards:
    a later ``import torch`` works as usual."""
    import sys

    if "torch" not in sys.modules and "onnxruntime.tools" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:  # quant_pre_process imports this package lazily, on its first call
            import onnxruntime.tools.symbolic_shape_infer  # noqa: F401
        finally:
            del sys.modules["torch"]
    from onnxruntime.quantization.shape_inference import quant_pre_process

    return quant_pre_process


@dataclass
class Prepared:
    """The model to quantize: its path, its graph (external data not loaded), whether it
    must be written with external data, and the pre-processing details."""

    path: Path
    model: ModelProto
    external: bool
    details: dict[str, Any]


# Nesting of If/Loop/Scan bodies past which pre-processing is skipped: onnxruntime's
# symbolic shape inference doubled its time with each level of a 3 KB model of nested Ifs
# (8 levels 1.6 s, 14 levels 22 s, 25 levels past 200 s; hostile-input trial), while real
# models nest two or three deep.
MAX_PREPROCESS_DEPTH = 8


def subgraph_depth(graph: GraphProto) -> int:
    """How deep If/Loop/Scan bodies nest in ``graph`` (0: none)."""
    deepest, todo = 0, [(graph, 0)]
    while todo:  # iterative: a deep nest must not exhaust Python's recursion
        current, depth = todo.pop()
        deepest = max(deepest, depth)
        todo += [(sub, depth + 1) for node in current.node for sub in subgraphs(node)]
    return deepest


def prepare(
    model_in: Path,
    work_dir: Path,
    mode: Preprocess = Preprocess.auto,
    *,
    dynamic: bool = False,
    check: Callable[[ModelProto], None] | None = None,
) -> Prepared:
    """Read ``model_in`` (PassError CorruptModel when it is not an ONNX model), run
    ``check`` on it as read, and pre-process it (``mode``: auto, as :func:`preprocess`
    does; never; always: a pre-processing that failed, wholly or in part, raises
    PassError(ConversionFailed) with onnxruntime's error). ``check`` (a refusal) runs before
    the pre-processing's cost and on the source's own initializers: on the pre-processed
    graph, whose constant folding turned Constant nodes into initializers, a refusal named
    more float16 weight bytes than the file held (new-user trial). Skipped in auto mode, and
    refused (ConversionFailed) in always mode, when subgraphs nest past
    MAX_PREPROCESS_DEPTH; skipped in auto mode for ``dynamic`` INT8 when it would change
    nothing the quantizer produces
    (:func:`~kquant_job.passes.int8_prep_need.dynamic_unaffected`). External data is used
    for the output when the input has external data or is at least 2 GiB (protobuf's
    limit)."""
    original = load_model(model_in, load_external_data=False)
    if check is not None:
        check(original)
    external = uses_external_data(original) or model_in.stat().st_size >= PROTOBUF_LIMIT
    work_dir.mkdir(parents=True, exist_ok=True)
    if mode is Preprocess.never:
        return Prepared(model_in, original, external, {"preprocess": "skipped (never)"})
    # only where quantize_dynamic's own load is shimmed (int8_shapes): the library's writes
    # a copy beside its input, here the source itself
    skip = mode is Preprocess.auto and dynamic and verified_onnxruntime()
    if skip and (why_not := dynamic_unaffected(original)):
        return Prepared(model_in, original, external, {"preprocess": f"skipped: {why_not}"})
    depth = subgraph_depth(original.graph)
    if depth > MAX_PREPROCESS_DEPTH:
        why = (f"subgraphs nested {depth} deep (more than {MAX_PREPROCESS_DEPTH}): "
               "onnxruntime's shape inference takes twice as long with each level")  # fmt: skip
        if mode is Preprocess.always:
            raise PassError(
                f"{model_in.name}: pre-processing refused: {why}; set "
                "spec.quantization.preprocess to auto or never",
                reason=Reason.ConversionFailed,
            )
        return Prepared(model_in, original, external, {"preprocess": f"skipped: {why}"})
    path, details = preprocess(model_in, work_dir, external)
    if mode is Preprocess.always and "preprocessError" in details:
        raise PassError(
            f"{model_in.name}: onnxruntime's quantization pre-processing failed "
            f"({details['preprocessError']}) and spec.quantization.preprocess is always",
            reason=Reason.ConversionFailed,
        )
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
