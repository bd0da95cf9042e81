"""Whether onnxruntime's quantization pre-processing can change what dynamic INT8 produces.

``quant_pre_process`` (onnxruntime 1.31, ``quantization/shape_inference.py``) infers shapes
and optimizes the graph at ``ORT_ENABLE_BASIC`` before quantization. For dynamic INT8 the
shapes are of no use (``quantize_dynamic`` infers them again itself), so what can matter is
the optimization (onnxruntime's graph optimization docs, "Basic Graph Optimizations"):

- constant folding: a weight computed from constants (a ``Constant`` node, a ``Transpose``
  or ``Identity`` of an initializer) becomes an initializer, which the quantizer then
  quantizes; it leaves a weight it cannot find in the initializers float. A ``Gather`` of
  an embedding table at constant indices is folded away, table and all (bert_tiny of the
  corpus: two position tables left float after pre-processing, quantized without it);
- Conv fusions (``BatchNormalization``, ``Add``, ``Mul`` into ``Conv``): a ``ConvInteger``
  keeps them apart at run time.

A graph with neither (no Conv; every input of a node the quantizer handles an initializer,
an activation or a graph input; no subgraphs) quantizes to the same nodes either way; on a
BERT-base encoder with external data pre-processing took 1.4-1.8 s of a 6 s job and
quantized the same 73 MatMuls. What it still folds is shape arithmetic (an Expand of an
input's shape): microseconds a run, which only a small model notices, and there the
pre-processing costs milliseconds, so it is skipped from SKIP_FROM_BYTES of weights only.
"""

from __future__ import annotations

from onnx import ModelProto

from kquant_job.passes.int8_common import DENSE_OP_TYPES
from kquant_job.passes.onnx_common import iter_graphs, subgraphs, tensor_bytes

__all__ = ["dynamic_unaffected"]

# Ops whose presence makes the optimization's fusions matter.
_FUSED = frozenset({"Conv", "ConvTranspose", "BatchNormalization"})
# The inputs onnxruntime's dynamic quantizer quantizes when they are initializers
# (``quantization/operators``: a bias stays float, Gemm's becomes an Add); every input of
# an op not listed.
_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMul": (0, 1), "Gemm": (0, 1), "Gather": (0,), "Transpose": (0,), "LSTM": (1, 2),
    "GRU": (1, 2), "Attention": (1,),
}  # fmt: skip
# Ops onnxruntime never folds: their output is not a constant.
_NOT_FOLDED = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                         "RandomUniformLike", "Multinomial", "Bernoulli"})  # fmt: skip


# Weights (bytes) from which dynamic INT8 skips a pre-processing that changes nothing it
# quantizes. Below, it runs: it costs milliseconds there, and its folding of shape arithmetic
# (an Expand of an input's shape into a constant) still saves microseconds a run, a visible
# share of a small model's latency (the corpus's LSTM/GRU: 1.1x against 1.7x its original's
# latency, 0.05 ms); above, it costs seconds (writing and reading every weight) for the same
# microseconds.
SKIP_FROM_BYTES = 64 * 1024 * 1024


def weight_bytes(model: ModelProto) -> int:
    """Bytes of the initializers of every graph, from their dims and types
    (:func:`~kquant_job.passes.onnx_common.tensor_bytes`; ``model`` may be loaded without
    its external data); string tensors count nothing."""
    return sum(
        tensor_bytes(t) or 0 for graph in iter_graphs(model.graph) for t in graph.initializer
    )


def dynamic_unaffected(model: ModelProto) -> str | None:
    """Why pre-processing would leave ``model``'s dynamic INT8 result as it is, or None when
    it may change it or costs little (see the module docstring). Unaffected: weights of at
    least SKIP_FROM_BYTES, a MatMul/Gemm/LSTM/GRU/
    Attention node, no subgraphs, no Conv, ConvTranspose or BatchNormalization, and no node
    dynamic INT8 quantizes (onnxruntime's ``IntegerOpsRegistry``: MatMul, Gather, Attention,
    LSTM...; Gemm, GRU) with every input computed from constants (folded away) or with a
    weight input computed from constants other than an initializer itself (an initializer
    only after folding)."""
    graph = model.graph
    if weight_bytes(model) < SKIP_FROM_BYTES:
        return None  # cheap here, and its folding still pays (SKIP_FROM_BYTES)
    if not any(node.op_type in DENSE_OP_TYPES for node in graph.node):
        return None  # nothing for it to quantize: the pass says so after pre-processing
    if any(True for node in graph.node for _ in subgraphs(node)):
        return None
    if any(node.op_type in _FUSED for node in graph.node):
        return None
    initializers = {t.name for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output if out}
    known: dict[str, bool] = {}

    def from_constants(name: str) -> bool:
        # iterative: a long chain must not exhaust Python's recursion; a value met again
        # before it is known lies on a cycle (a malformed graph): not a constant
        todo, entered = [name], set()
        while todo:
            current = todo[-1]
            if current in known:
                todo.pop()
                continue
            node = producers.get(current)
            if current in initializers or (node is not None and node.op_type == "Constant"):
                known[current] = True
            elif node is None or node.op_type in _NOT_FOLDED or not any(node.input):
                known[current] = False
            elif current not in entered:
                entered.add(current)
                todo += [i for i in node.input if i and i not in known and i not in entered]
                continue
            else:
                known[current] = all(known.get(i, False) for i in node.input if i)
            todo.pop()
        return known[name]

    from onnxruntime.quantization.registry import IntegerOpsRegistry

    quantized = frozenset(IntegerOpsRegistry) | set(DENSE_OP_TYPES)
    for node in graph.node:
        if node.op_type not in quantized:
            continue
        inputs = [name for name in node.input if name]
        if inputs and all(from_constants(name) for name in inputs):
            return None  # folded away by pre-processing, weights and all
        positions = _WEIGHT_INPUTS.get(node.op_type)
        weights = [n for i, n in enumerate(node.input) if positions is None or i in positions]
        if any(n and n not in initializers and from_constants(n) for n in weights):
            return None  # a weight an initializer only after folding
    return "no Conv, and every weight already an initializer: nothing it changes for dynamic INT8"
