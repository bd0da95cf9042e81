"""What an ONNX pass refuses from the graph alone, before converting: one list for the
passes and for the dry run (which then exits as the run would: a dry run of int4 on a
convolutional model passed, and the run failed)."""

from __future__ import annotations

from collections import Counter

from onnx import ModelProto

from kquant_api import Precision, Reason
from kquant_job.errors import PassError
from kquant_job.passes.int8_attempts import count_quantized, refuse_quantized
from kquant_job.passes.onnx_common import (
    iter_graphs,
    iter_nodes,
    refuse_integer,
    refuse_reduced,
)


def weighted_matmuls(model: ModelProto) -> list[str]:
    """Names of the MatMul nodes (every graph) whose second input is a 2-D initializer: the
    nodes MatMulNBits can replace."""
    weights = {t.name for g in iter_graphs(model.graph) for t in g.initializer if len(t.dims) == 2}
    return [
        n.name or f"MatMul#{i}"
        for i, (_, n) in enumerate(iter_nodes(model.graph))
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights
    ]


# Ops that only reshape, cut or join what they are given: a weight passes through them
# (Silero's LSTM weights: Constant -> Slice -> Unsqueeze -> LSTM).
_PASS_THROUGH = frozenset({"Cast", "Concat", "Identity", "Reshape", "Slice", "Split",
                           "Squeeze", "Transpose", "Unsqueeze"})  # fmt: skip


def _weight_owners(model: ModelProto) -> str:
    """What the model's weights feed instead, e.g. ``"its weights feed 12 Conv, 4 LSTM"``.
    Weights are initializers and the tensors of Constant nodes of rank 2 or more, followed
    through ops that only reshape or cut them (_PASS_THROUGH) to the ops that use them
    (Silero VAD keeps its weights in Constant nodes: the refusal said "its weights feed no
    weights", new-user trial)."""
    weights = {t.name for g in iter_graphs(model.graph) for t in g.initializer if t.dims}
    nodes = [n for _, n in iter_nodes(model.graph)]
    for node in nodes:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and len(value.dims) >= 2:
                weights.update(node.output)
    for _ in range(8):  # subgraphs may come before the outer nodes that feed them
        grown = {o for n in nodes if n.op_type in _PASS_THROUGH and n.input
                 and n.input[0] in weights for o in n.output} - weights  # fmt: skip
        if not grown:
            break
        weights |= grown
    owners = Counter(
        n.op_type
        for n in nodes
        if any(i in weights for i in n.input) and n.op_type not in _PASS_THROUGH | {"Constant"}
    )
    if not owners:
        return "it holds no weight tensors"
    return "its weights feed " + ", ".join(f"{c} {op}" for op, c in owners.most_common(4))


def refuse(model: ModelProto, name: str, precision: Precision) -> None:
    """Raise what converting ``model`` (file ``name``) to ``precision`` refuses before any
    work: PassError(AlreadyQuantized) for a model already in that precision or quantized
    (:func:`~kquant_job.passes.onnx_common.refuse_reduced`, ``refuse_integer``,
    :func:`~kquant_job.passes.int8_attempts.refuse_quantized`); PassError(ConversionFailed)
    for int4 on a model with no MatMul on a constant 2-D weight. Reads the graph and the
    initializers' dims only (``model`` may be loaded without external data)."""
    if precision is Precision.fp16:
        refuse_reduced(model, name, "fp16")
        refuse_integer(model, name, count_quantized(model)["quantizedNodes"])
    elif precision is Precision.int8:
        refuse_quantized(model, name)
        refuse_reduced(model, name, "int8")
    elif precision is Precision.int4:
        refuse_quantized(model, name)
        if not weighted_matmuls(model):
            raise PassError(
                f"int4 weight-only quantization replaces MatMul nodes on constant 2-D weights "
                f"(transformer projections) with MatMulNBits; {name} has none "
                f"({_weight_owners(model)}): use int8 or fp16 for it",
                reason=Reason.ConversionFailed,
            )
