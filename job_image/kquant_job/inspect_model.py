"""What a model file holds, for ``kquant-job inspect``: runs inside the sandbox (a model file
is parsed here, and a TorchScript file is code).

ONNX: the I/O signature, opsets, op-type counts (subgraphs included), nodes (index, name, op
type, inputs; filtered by op type or name), initializers (dtype, shape, bytes, value range),
subgraphs, what an FP16 conversion would keep FP32 and why, and whether the model is already
quantized. PyTorch state dicts and safetensors: their tensors. TorchScript: ``forward``'s
arguments and the module's parameters.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kquant_api import ModelFormat
from kquant_job.beside import KQUANT_DIR
from kquant_job.formats import check_model_file, plan_model

# Op types of already quantized graphs (QDQ, QOperator, dynamic INT8, onnxruntime's contrib).
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
        "ConvInteger", "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul",
        "DynamicQuantizeMatMul", "MatMulNBits", "QAttention", "QGemm", "DynamicQuantizeLSTM",
    }
)  # fmt: skip
MAX_NODES = 20000


def _dims(value_info: Any) -> list[Any]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def inspect_onnx(path: Path, op_type: str | None, name: str | None) -> dict[str, Any]:
    """The ONNX report (see the module docstring); ``op_type``/``name`` filter the node list
    (exact op type, substring of the name)."""
    import onnx

    from kquant_job.passes.onnx_common import iter_graphs, iter_nodes, load_model
    from kquant_job.passes.onnx_fp16 import DEFAULT_OP_BLOCK_LIST
    from kquant_job.passes.onnx_fp16_ranges import scan_out_of_range

    model = load_model(path, load_external_data=True)
    graph = model.graph
    io = {
        "inputs": [
            {"name": i.name, "type": onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type),
             "shape": _dims(i)}
            for i in graph.input if i.name not in {t.name for t in graph.initializer}
        ],
        "outputs": [
            {"name": o.name, "type": onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type),
             "shape": _dims(o)}
            for o in graph.output
        ],
    }  # fmt: skip
    nodes = list(iter_nodes(graph))
    counts = Counter(n.op_type for _, n in nodes)
    listed = [
        {"index": i, "name": n.name, "opType": n.op_type, "inputs": list(n.input),
         "inSubgraph": g is not graph}
        for i, (g, n) in enumerate(nodes)
        if (op_type is None or n.op_type == op_type) and (name is None or name in n.name)
    ]  # fmt: skip
    initializers = [_tensor_entry(t, False) for g in iter_graphs(graph) for t in g.initializer]
    for _, node in nodes:  # weights exported as Constant nodes count as weights too
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    initializers.append(_tensor_entry(attr.t, True, node.output[0]))
    out_of_range, range_nodes = scan_out_of_range(model, path.parent)
    blocked = sorted(set(counts) & set(DEFAULT_OP_BLOCK_LIST))
    quantized = sorted(set(counts) & QUANTIZED_OPS)
    return {
        "format": "onnx",
        "irVersion": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        **io,
        "opTypes": dict(sorted(counts.items())),
        "nodes": listed[:MAX_NODES],
        "nodesListed": len(listed),
        "initializers": initializers,
        "subgraphs": sum(1 for _ in iter_graphs(graph)) - 1,
        "fp16KeepsFp32": {
            "opTypes": {op: "in the default opBlockList" for op in blocked},
            "initializers": {k: f"beyond FP16's range ({v})" for k, v in out_of_range.items()},
            "nodes": sorted(range_nodes),
        },
        "precision": _precision(initializers, quantized),
    }  # fmt: skip


def _tensor_entry(tensor: Any, constant: bool, name: str | None = None) -> dict[str, Any]:
    from onnx import numpy_helper

    arr = numpy_helper.to_array(tensor)
    entry: dict[str, Any] = {
        "name": name or tensor.name,
        "dtype": str(arr.dtype),
        "shape": list(arr.shape),
        "bytes": int(arr.nbytes),
        "constant": constant,
    }
    if arr.size and arr.dtype.kind in "fiu":
        entry["min"], entry["max"] = float(arr.min()), float(arr.max())
    return entry


def _precision(tensors: list[dict[str, Any]], quantized_ops: list[str]) -> dict[str, Any]:
    """What the weights already are: bytes by dtype, the dtype holding most weight bytes
    among floats and 8-bit integers, and whether the model is already quantized (QDQ or
    integer ops, or 8-bit weights) or already FP16/BF16."""
    by_dtype: Counter[str] = Counter()
    for t in tensors:
        by_dtype[t["dtype"]] += t["bytes"]
    weights = {k: v for k, v in by_dtype.items() if k.startswith(("float", "bfloat")) or k in (
        "int8", "uint8")}  # fmt: skip
    main = max(weights, key=lambda k: weights[k]) if weights else None
    return {
        "bytesByDtype": dict(sorted(by_dtype.items())),
        "weights": main,
        "alreadyQuantized": bool(quantized_ops) or main in ("int8", "uint8"),
        "alreadyReduced": main in ("float16", "bfloat16", "int8", "uint8"),
        "quantizedOps": quantized_ops,
    }


def inspect_torch(path: Path, fmt: ModelFormat) -> dict[str, Any]:
    """Tensors of a state dict or safetensors file; forward's arguments and parameters of a
    TorchScript module."""
    if fmt is ModelFormat.torchscript:
        from kquant_job.passes.torch_script import load_script
        from kquant_job.validate.torch_outputs import script_arguments

        module = load_script(path, path.name)
        tensors = {n: t for n, t in module.named_parameters()}
        tensors.update(dict(module.named_buffers()))
        report: dict[str, Any] = {
            "format": "torchscript",
            "forward": [
                {"name": n, "type": t, "default": d} for n, t, d in script_arguments(module)
            ],
            "resetStates": bool(module._c._has_method("reset_states")),
        }
    elif fmt is ModelFormat.safetensors:
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        report = {"format": "safetensors"}
    else:
        from kquant_job.passes.torch_common import load_checkpoint

        loaded = load_checkpoint(path, path.name)
        tensors = _flat_tensors(loaded)
        report = {"format": "pytorch"}
    entries = [_torch_entry(n, t) for n, t in tensors.items()]
    by_dtype = Counter(e["dtype"] for e in entries)
    return {
        **report,
        "tensors": entries,
        "tensorsByDtype": dict(sorted(by_dtype.items())),
        "precision": _precision(entries, []),
    }


def _torch_entry(name: str, tensor: Any) -> dict[str, Any]:
    """Name, dtype, shape, bytes and (floats) range of a torch tensor or numpy array."""
    if hasattr(tensor, "detach"):
        t = tensor.detach()
        dtype, nbytes = str(t.dtype).removeprefix("torch."), t.numel() * t.element_size()
        floating, shape = t.is_floating_point(), list(t.shape)
        low_high = (float(t.min()), float(t.max())) if floating and t.numel() else None
    else:
        arr = np.asarray(tensor)
        dtype, nbytes, shape = str(arr.dtype), int(arr.nbytes), list(arr.shape)
        low_high = (
            (float(arr.min()), float(arr.max())) if arr.dtype.kind == "f" and arr.size else None
        )
    entry: dict[str, Any] = {"name": name, "dtype": dtype, "shape": shape, "bytes": int(nbytes)}
    if low_high:
        entry["min"], entry["max"] = low_high
    return entry


def _flat_tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_flat_tensors(value, f"{prefix}{key}."))
    elif hasattr(obj, "shape") and hasattr(obj, "dtype"):
        out[prefix.rstrip(".")] = obj
    return out


def inspect_file(
    path: Path, op_type: str | None = None, name: str | None = None, rel: str | None = None
) -> dict[str, Any]:
    """The report of one model file (``rel``: its name in reports, default its file name), by
    its detected format. Raises PassError (UnsupportedFormat, CorruptModel, UnsafeModel) as a
    conversion would."""
    fmt = check_model_file(path, ModelFormat.auto, rel or path.name)
    report = (
        inspect_onnx(path, op_type, name) if fmt is ModelFormat.onnx else inspect_torch(path, fmt)
    )
    return {"file": rel or path.name, "bytes": path.stat().st_size, **report}


def inspect_path(path: Path, op_type: str | None = None, name: str | None = None) -> dict:
    """``{"models": [report, ...], "otherFiles": [rel, ...]}`` for a model file or every model
    file of a directory (found as a job would find them, none excluded), and ``kquantFiles``,
    the number of files left out under an output prefix's ``.kquant/``. Raises PassError
    (UnsupportedFormat when a directory holds no model file, CorruptModel, UnsafeModel)."""
    if path.is_file():
        return {"models": [inspect_file(path, op_type, name)], "otherFiles": []}
    plan = plan_model(path, ModelFormat.auto, None, [])
    # an output prefix's .kquant/ holds kquant's own sets, which its names copy: counted
    own = [m.rel for m in plan.models if m.rel.startswith(KQUANT_DIR)]
    own += [c for c in plan.copies if c.startswith(KQUANT_DIR)]
    models = [m for m in plan.models if m.rel not in own]
    reports = [inspect_file(plan.root / m.rel, op_type, name, m.rel) for m in models]
    report: dict[str, Any] = {"models": reports,
                              "otherFiles": [c for c in plan.copies if c not in own]}  # fmt: skip
    if own:
        report["kquantFiles"] = len(own)
    return report
