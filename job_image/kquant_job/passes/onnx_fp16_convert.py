"""One FP16 conversion with onnxruntime's converter, made safe for the repair ladder.

:func:`convert` calls ``onnxruntime.transformers.float16.convert_float_to_float16`` and then
fixes three defects of its output that show up as soon as nodes inside If/Loop/Scan bodies
are blocked (measured on the Silero VAD variants, onnxruntime 1.31):

- the Cast nodes it inserts around blocked nodes all go to the main graph, even when the
  blocked node sits in a subgraph ("Node input ... is not a graph input" / "Graph output
  ... does not exist"): each is moved into the graph where its input is defined;
- a tensor read by two blocked nodes gets two Casts with the same name and output ("two
  nodes with same node name"): duplicates are dropped;
- a blocked If/Loop/Scan keeps its body FP32 but the body still reads FP16 values of the
  outer graph (type errors): a blocked control-flow node is replaced by all the nodes
  inside it, so the casts land on the body's own nodes;
- between two blocked nodes the tensor still takes a trip through FP16 (Cast to FP16
  after the first, Cast back to FP32 before the second), which turns 1e6 into inf: the
  second Cast is fed from the FP32 tensor instead, and an FP16 Cast left unused dropped.

Inserted Casts are placed right after the node that produces their input, so every graph
stays topologically sorted.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import ModelProto, NodeProto, TensorProto
from onnxruntime.transformers import float16 as ort_float16

from kquant_job.passes.onnx_common import CONTROL_FLOW_OPS, inner_nodes, iter_graphs, iter_nodes
from kquant_job.passes.onnx_external import park_external, restore_external
from kquant_job.validate.runtime import model_bytes


def converter_block_lists(
    model: ModelProto, ops: set[str], nodes: set[str]
) -> tuple[set[str], set[str]]:
    """The block lists handed to onnxruntime's converter: If/Loop/Scan named by op type or
    node name are replaced by every node inside their bodies (see module docstring), and a
    Constant read only by blocked nodes is blocked too, so it keeps its FP32 value the way
    the converter keeps such an initializer FP32."""
    cf_ops = ops & CONTROL_FLOW_OPS
    out_nodes = set(nodes)
    control_flow: set[str] = set()
    readers: dict[str, list[NodeProto]] = {}
    for _, node in iter_nodes(model.graph):
        for name in node.input:
            readers.setdefault(name, []).append(node)
        if node.op_type in CONTROL_FLOW_OPS:
            control_flow.add(node.name)
            if node.op_type in cf_ops or node.name in nodes:
                out_nodes.update(inner.name for inner in inner_nodes(node))
    out_ops = ops - CONTROL_FLOW_OPS
    out_nodes -= control_flow
    for _, node in iter_nodes(model.graph):
        if node.op_type == "Constant" and node.output and node.name not in out_nodes:
            users = readers.get(node.output[0], [])
            if users and all(u.op_type in out_ops or u.name in out_nodes for u in users):
                out_nodes.add(node.name)
    return out_ops, out_nodes


def convert(
    base: ModelProto,
    *,
    keep_io_types: bool,
    ops: set[str],
    nodes: set[str],
) -> ModelProto:
    """A converted copy of ``base`` (whose node names are unique and whose value_info comes
    from shape inference); ``base`` itself is left untouched.

    ``base`` may reference external data: the copy keeps referring to it
    (tensors typed FLOAT16 there still point at FP32 bytes) and is written with
    :func:`~kquant_job.passes.onnx_external.save_streaming`, which casts them one at a time.
    ``ops`` are op types and ``nodes`` node names kept FP32; ``keep_io_types`` keeps FP32
    model inputs and outputs (Casts at the edges).
    """
    model = ModelProto()
    model.CopyFrom(base)
    parked = park_external(model)
    original = {node.name for _, node in iter_nodes(model.graph)}
    conv_ops, conv_nodes = converter_block_lists(model, ops, nodes)
    model = ort_float16.convert_float_to_float16(
        model,
        keep_io_types=keep_io_types,
        disable_shape_infer=True,  # done once on the base; infer_shapes fails beyond 2 GiB
        op_block_list=sorted(conv_ops),
        node_block_list=sorted(conv_nodes),
    )
    restore_external(model, parked)
    _place_inserted_casts(model, original)
    _skip_fp16_round_trips(model, original)
    _retype_fp32_initializers(model)
    return model


def _skip_fp16_round_trips(model: ModelProto, original: set[str]) -> None:
    """Feed each inserted Cast-to-FP32 whose input comes from an inserted Cast-to-FP16 from
    that Cast's FP32 input (a Cast FP32 -> FP32 is a no-op), then drop FP16 Casts that no
    longer have a reader."""
    casts = {
        node.output[0]: node
        for _, node in iter_nodes(model.graph)
        if node.op_type == "Cast" and node.name not in original
    }
    for cast in casts.values():
        up = casts.get(cast.input[0])
        to_fp32 = _cast_to(cast) == TensorProto.FLOAT
        if to_fp32 and up is not None and _cast_to(up) == TensorProto.FLOAT16:
            cast.input[0] = up.input[0]
    read = {name for _, node in iter_nodes(model.graph) for name in node.input}
    for graph in iter_graphs(model.graph):
        read.update(out.name for out in graph.output)
    for graph in iter_graphs(model.graph):
        dead = [
            i
            for i, node in enumerate(graph.node)
            if node.name not in original and node.output[0] in casts and node.output[0] not in read
        ]
        for i in reversed(dead):
            del graph.node[i]


def _cast_to(node: NodeProto) -> int:
    return next((attr.i for attr in node.attribute if attr.name == "to"), 0)


def _retype_fp32_initializers(model: ModelProto) -> None:
    """The converter turns every float value_info into FP16, also that of an initializer it
    kept FP32 (all consumers blocked, or none); declare those FP32 again."""
    for graph in iter_graphs(model.graph):
        fp32 = {init.name for init in graph.initializer if init.data_type == TensorProto.FLOAT}
        for vi in (*graph.input, *graph.value_info):
            tensor_type = vi.type.tensor_type
            if vi.name in fp32 and tensor_type.elem_type == TensorProto.FLOAT16:
                tensor_type.elem_type = TensorProto.FLOAT


def _place_inserted_casts(model: ModelProto, original: set[str]) -> None:
    """Move the converter's Casts (all appended to the main graph) right after the producer
    of their input, in the graph that defines it; drop duplicates."""
    main = model.graph
    inserted: list[NodeProto] = []
    seen_outputs: set[str] = set()
    keep: list[NodeProto] = []
    for node in main.node:
        if node.op_type == "Cast" and node.name not in original:
            if node.output[0] not in seen_outputs:
                seen_outputs.add(node.output[0])
                inserted.append(node)
        else:
            keep.append(node)
    if not inserted:
        return
    inserted = [_copy(node) for node in inserted]
    main.node.sort(key=lambda n: n.op_type == "Cast" and n.name not in original)
    del main.node[len(keep) :]

    graphs = list(iter_graphs(main))
    producer: dict[str, tuple[int, str | None]] = {}  # tensor -> (graph index, node output key)
    for gi, graph in enumerate(graphs):
        for vi in (*graph.input, *graph.initializer):
            producer.setdefault(vi.name, (gi, None))
        for node in graph.node:
            for out in node.output:
                producer.setdefault(out, (gi, _key(node)))
    after: dict[tuple[int, str | None], list[NodeProto]] = {}
    pending = inserted
    while pending:
        left = []
        for cast in pending:
            src = producer.get(cast.input[0])
            if src is None:
                left.append(cast)
                continue
            after.setdefault(src, []).append(cast)
            producer[cast.output[0]] = (src[0], _key(cast))
        if len(left) == len(pending):  # inputs defined nowhere: leave them to the load check
            after.setdefault((0, "\0end"), []).extend(left)
            break
        pending = left

    value_info = {vi.name: vi for vi in main.value_info}
    subgraph_names: set[str] = set()
    for gi, graph in enumerate(graphs):
        rank: dict[str, int] = {}

        def emit(anchor: str | None, graph_index: int = gi, rank: dict[str, int] = rank) -> None:
            for cast in after.get((graph_index, anchor), []):
                rank[_key(cast)] = len(rank)
                emit(_key(cast))

        emit(None)
        for node in graph.node:
            rank.setdefault(_key(node), len(rank))
            emit(_key(node))
        emit("\0end")
        moved = [c for c in inserted if _key(c) in rank]
        if not moved:
            continue
        graph.node.extend(moved)
        graph.node.sort(key=lambda n, rank=rank: rank[_key(n)])
        if gi:  # the converter wrote these casts' value_info into the main graph
            names = {c.output[0] for c in moved if c.output[0] in value_info}
            graph.value_info.extend(value_info[name] for name in sorted(names))
            subgraph_names.update(names)
    _dedupe_value_info(main, drop=subgraph_names)


def _key(node: NodeProto) -> str:
    return node.name + "\0" + "\0".join(node.output)


def _copy(node: NodeProto) -> NodeProto:
    copy = NodeProto()
    copy.CopyFrom(node)
    return copy


def _dedupe_value_info(graph: onnx.GraphProto, drop: set[str]) -> None:
    """Keep the first value_info of each name, none for the names in ``drop``."""
    seen = set(drop)
    kept = []
    for vi in graph.value_info:
        if vi.name not in seen:
            seen.add(vi.name)
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(vi)
            kept.append(copy)
    if len(kept) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept)


# Beyond this many bytes (model file plus data files) the load check runs without graph
# optimizations: on CPU they constant-fold an FP32 copy of every FP16 weight (a 1.1 GB FP16
# model peaks at 4.3 GB instead of 1.2 GB).
UNOPTIMIZED_CHECK_BYTES = 2**30


def ort_load_error(path: Path) -> str | None:
    """None when onnxruntime (CPU) can create a session for the model at ``path``, else its
    error message. Default graph optimizations, except for models over 1 GiB (see
    UNOPTIMIZED_CHECK_BYTES): graph resolution, type checks and kernel lookup run either
    way; an error only an optimizer would raise shows in the probe, which runs the model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the message comes back as an exception
    if model_bytes(path) > UNOPTIMIZED_CHECK_BYTES:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        return str(exc)
    return None
