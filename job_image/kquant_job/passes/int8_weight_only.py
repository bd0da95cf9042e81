"""Weight-only INT8 for the Conv layers that INT8 dynamic leaves float.

onnxruntime's ConvInteger ran the corpus' OCR and detection models 2.7-3.5x slower than
FP32 on the CPU (and the CUDA provider has no kernel for it), so the gain rule leaves Conv
float. Its weights can still be stored in 8 bits: ``int8 -> Cast(float) -> Mul(scale)``
in front of the Conv. onnxruntime constant-folds that chain when the session is created
(ORT_ENABLE_BASIC and up), so the model it runs is the float graph and runs at FP32's speed,
while the file holds a quarter of the bytes. Measured on PP-OCR v4 det, NudeNet 320n and
ddddocr det (onnxruntime 1.31.1, CPU): 0.26-0.27x the size, 0.99-1.11x the latency (noise:
the optimized graphs equal FP32's), output cosine 0.9988-0.99996 against ConvInteger's
0.979-0.9997. A DequantizeLinear in place of Cast and Mul is not folded by default (kept
for QDQ fusion unless ``session.disable_quant_qdq``) and ran 1.16-1.95x slower. No
onnxruntime tool writes this form for Conv (``matmul_nbits_quantizer`` handles MatMul only,
and QDQ ``quantize_static`` always quantizes the Conv's input too). Memory at run time is
FP32's: the saving is in the file (download, storage, image size).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from kquant_job.passes.onnx_common import inner_nodes, iter_graphs

WEIGHT_ONLY_OP_TYPES = ("Conv", "ConvTranspose")
MIN_ELEMENTS = 1024  # below this the per-channel scales and two nodes outweigh the bytes saved
_SUFFIX = "_kquant_w8"


def quantize_symmetric(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice symmetric INT8 of ``weight`` (float32, rank >= 2) along axis 0 (Conv:
    output channels; ConvTranspose: input channels): ``scale = max|w| / 127`` per slice (1
    where a slice is all zeros), ``q = clip(round(w / scale), -127, 127)``. Returns ``(q``
    int8 of ``weight``'s shape, ``scale`` float32 shaped ``(C, 1, ..., 1)``). -128 is left
    out so that the range is symmetric, as onnxruntime's symmetric weights. A slice whose
    scale underflows to 0 (all of it below 127 times the smallest float) is stored as 0."""
    amax = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)
    scale = (amax / np.float32(127.0)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # 0, or underflow
    scale = scale.reshape((weight.shape[0],) + (1,) * (weight.ndim - 1))
    q = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    return q, scale


def _float_tensors(model: ModelProto) -> dict[str, tuple[TensorProto, NodeProto | None]]:
    """Main-graph float32 tensors held inline: initializers (not graph inputs, which a
    caller may override) and Constant nodes' ``value``; name -> (tensor, Constant or None)."""
    inputs = {i.name for i in model.graph.input}
    found: dict[str, tuple[TensorProto, NodeProto | None]] = {}
    for init in model.graph.initializer:
        if init.name not in inputs and init.data_type == TensorProto.FLOAT:
            found[init.name] = (init, None)
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1:
            attr = node.attribute[0]
            if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                found[node.output[0]] = (attr.t, node)
    return found


def _restorable(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`quantize_symmetric` of ``weight`` when what Cast and Mul restore (float32, as
    onnxruntime computes it) is within half a step of every element, else None: a weight
    with NaN or Inf (no scale holds it: NaN would turn into an arbitrary integer), or one
    near the float32 maximum (``127 * scale`` rounds past it to Inf)."""
    if not np.all(np.isfinite(weight)):
        return None
    q, scale = quantize_symmetric(weight)
    with np.errstate(over="ignore"):
        restored = q.astype(np.float32) * scale
    if not np.all(np.isfinite(restored)):
        return None
    if np.any(np.abs(restored - weight) > scale * np.float32(0.5001)):  # q has w's sign
        return None
    return q, scale


def _taken_names(model: ModelProto) -> set[str]:
    """Every tensor and node name in every graph of ``model`` (a new name must be none of
    them: a second definition makes the model invalid or, where onnxruntime lets one shadow
    the other, silently wrong)."""
    names: set[str] = set()
    for graph in iter_graphs(model.graph):
        for group in (graph.initializer, graph.input, graph.output, graph.value_info):
            names.update(t.name for t in group)
        names.update(s.values.name for s in graph.sparse_initializer)
        for node in graph.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
    return names


def _fresh(base: str, taken: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``... the first not in ``taken`` (then taken)."""
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def store_weights_int8(
    model: ModelProto, op_types: tuple[str, ...], exclude: tuple[str, ...] = ()
) -> list[str]:
    """Store the weights of the main graph's ``op_types`` layers (not named in ``exclude``)
    as INT8 restored by Cast and Mul (:func:`quantize_symmetric`), in place. A weight is
    taken when it is an inline float32 tensor of rank >= 3 and at least MIN_ELEMENTS
    elements, held in external data by no one, and consumed only as the weight input of such
    layers (a shared weight is stored once), not read inside a subgraph (outer scope), finite
    and restorable within half a step (:func:`_restorable`). Subgraphs are left as they are.
    New names are unique in the model. Returns the names of the layers whose weights are now
    INT8 (none below opset 7, whose Mul does not broadcast without an attribute, nor below
    IR version 4, where an initializer must also be a graph input, which onnxruntime does
    not fold)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 7 or model.ir_version < 4:
        return []
    tensors = _float_tensors(model)
    users: dict[str, list[NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            users[name].append(node)
    for graph_output in model.graph.output:
        users[graph_output.name].append(NodeProto())  # an output is not only a weight
    for node in model.graph.node:  # read inside a subgraph: by whatever op, left as it is
        for inner in inner_nodes(node):
            for name in inner.input:
                users[name].append(NodeProto())
    chosen: dict[str, list[NodeProto]] = {}
    stored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in model.graph.node:
        if node.op_type not in op_types or node.name in exclude or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in chosen or name not in tensors:
            continue
        tensor, _ = tensors[name]
        if (
            len(tensor.dims) < 3
            or int(np.prod(tensor.dims)) < MIN_ELEMENTS
            or tensor.data_location == TensorProto.EXTERNAL
        ):
            continue
        consumers = users[name]
        if all(
            u.op_type in op_types and u.name not in exclude and list(u.input[1:2]) == [name]
            and name not in u.input[:1] and name not in u.input[2:]
            for u in consumers
        ):  # fmt: skip
            quantized = _restorable(numpy_helper.to_array(tensor).astype(np.float32))
            if quantized is not None:
                chosen[name], stored[name] = consumers, quantized
    if not chosen:
        return []
    taken = _taken_names(model)
    added: list[NodeProto] = []
    for name in chosen:
        q, scale = stored[name]
        q_name = _fresh(name + _SUFFIX, taken)
        s_name, cast_out = _fresh(q_name + "_scale", taken), _fresh(q_name + "_f", taken)
        model.graph.initializer.extend(
            [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)]
        )
        cast = helper.make_node("Cast", [q_name], [cast_out], to=TensorProto.FLOAT)
        cast.name = _fresh(q_name + "_cast", taken)
        added.append(cast)
        mul = helper.make_node(
            "Mul", [cast_out, s_name], [name], name=_fresh(q_name + "_mul", taken)
        )
        added.append(mul)
    kept_inits = [i for i in model.graph.initializer if i.name not in chosen]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits)
    kept_nodes = [
        n for n in model.graph.node if not (n.op_type == "Constant" and n.output[0] in chosen)
    ]
    del model.graph.node[:]
    model.graph.node.extend(added + kept_nodes)  # restored weights first: topological order
    return sorted({u.name for consumers in chosen.values() for u in consumers})


def count_weight_only(model: ModelProto) -> int:
    """Layers fed by a weight that a Cast of an 8-bit integer initializer restores, times a
    scale (this module's form), in the main graph. The scale is a float constant with fewer
    values than the integers, or one per slice along axis 0: an integer mask times a float
    weight of its shape (the weight is float, the integers only zero some of it) is not
    counted."""
    int8 = (TensorProto.INT8, TensorProto.UINT8)
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in int8}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    constants = {i.name: i for i in model.graph.initializer if i.data_type in floats}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[:1]:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in floats:
                    constants[node.output[0]] = attr.t
    casts = {  # Cast output -> the number of integers it holds
        n.output[0]: sizes[n.input[0]]
        for n in model.graph.node
        if n.op_type == "Cast" and n.input[:1] and n.input[0] in sizes and n.output[:1]
    }

    def scales(name: str, cast: str) -> bool:
        tensor = constants.get(name)
        return tensor is not None and (
            int(np.prod(tensor.dims)) < casts[cast] or all(d == 1 for d in tensor.dims[1:])
        )

    restored = {
        n.output[0]
        for n in model.graph.node
        if n.op_type == "Mul"
        and len(n.input) == 2
        and n.output[:1]
        and any(a in casts and scales(b, a) for a, b in (n.input, n.input[::-1]))
    }
    return sum(
        n.op_type in WEIGHT_ONLY_OP_TYPES and len(n.input) > 1 and n.input[1] in restored
        for n in model.graph.node
    )
