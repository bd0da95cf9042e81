"""Make a TorchScript module run with FP16/BF16 weights while callers keep passing and
getting FP32: casts inserted into its TorchScript graphs, as automatic mixed precision does at
run time.

Casting a scripted module's parameters alone breaks most real models: code creates FP32
tensors of its own (``torch.zeros(...)`` for a state, ``x.to(torch.float32)``, an FP32
context buffer concatenated with the input), and the next operator then meets FP32 data and
FP16 weights (``RuntimeError: Input type (float) and bias type (c10::Half) should be the
same``; Silero VAD's ``silero_vad.jit`` fails so). So, in every method of the top module,
after inlining the calls into submodules (``torch._C._jit_pass_inline``, which makes every
parameter a ``prim::GetAttr`` value in the method's own graph):

- each operator that takes a tensor attribute (a parameter or buffer) gets its other floating
  tensor inputs cast to that attribute's dtype *at run time* (``_like``), so it computes
  in the dtype of its weights, whatever the caller or the code fed it. Integer and bool
  inputs (indices, masks) are left alone, and an FP32-kept module gets FP32 inputs back;
- each FP16/BF16 tensor a method returns is cast back to FP32 (``_restore``).

Inputs therefore keep their types (the module takes FP32 as before) and so do outputs. An
output that was FP16 in the original comes back FP32. The graphs are changed in place;
``torch.jit.save`` writes the changed code.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kquant_job.passes.torch_common import require_torch

# Nodes whose inputs are never cast: control flow, containers, attribute access, metadata
# queries and the model's own explicit conversions.
_SKIP = frozenset(
    {
        "prim::GetAttr",
        "prim::SetAttr",
        "prim::CallMethod",
        "prim::CallFunction",
        "prim::If",
        "prim::Loop",
        "prim::ListConstruct",
        "prim::ListUnpack",
        "prim::TupleConstruct",
        "prim::TupleUnpack",
        "prim::Constant",
        "prim::RaiseException",
        "prim::unchecked_cast",
        "prim::device",
        "prim::dtype",
        "aten::__is__",
        "aten::__isnot__",
        "aten::size",
        "aten::dim",
        "aten::len",
        "aten::to",
        "aten::type_as",
    }
)

# TorchScript source of the casts; compiled once, their graphs inlined into the model.
_HELPER_SOURCE = """
def _like(x: Tensor, ref: Tensor) -> Tensor:
    if x.is_floating_point() and ref.is_floating_point() and x.dtype != ref.dtype:
        return x.to(ref.dtype)
    return x

def _like_list(x: Tensor, refs: List[Tensor]) -> Tensor:
    if len(refs) > 0:
        ref = refs[0]
        if x.is_floating_point() and ref.is_floating_point() and x.dtype != ref.dtype:
            return x.to(ref.dtype)
    return x

def _restore(x: Tensor) -> Tensor:
    if x.dtype == 5 or x.dtype == 15:
        return x.float()
    return x
"""  # 5, 15: c10::ScalarType Half and BFloat16 (a dtype is an int in TorchScript)
_HELPERS: dict[str, Any] = {}


def _helpers() -> dict[str, Any]:
    """Graphs of the cast helpers by name: ``_like(x, ref)``, ``_like_list(x, refs)`` (the
    first of ``refs`` as the reference) and ``_restore(x)``."""
    if not _HELPERS:
        unit = require_torch().jit.CompilationUnit(_HELPER_SOURCE)
        for name in ("_like", "_like_list", "_restore"):
            _HELPERS[name] = getattr(unit, name).graph
    return _HELPERS


def _kind(value: Any) -> str:
    return value.type().kind()


def _attr_tensor(value: Any) -> bool:
    return value.node().kind() == "prim::GetAttr" and _kind(value) == "TensorType"


def _attr_tensor_list(value: Any) -> bool:
    return value.node().kind() == "prim::GetAttr" and str(value.type()) == "List[Tensor]"


def _nodes(block: Any) -> Iterator[Any]:
    for node in list(block.nodes()):
        yield node
        for sub in node.blocks():
            yield from _nodes(sub)


def _cast_before(graph: Any, node: Any, helper: str, args: list[Any]) -> Any:
    with graph.insert_point_guard(node):
        (out,) = graph.insertGraph(_helpers()[helper], args)
    return out


def _tensor_list_build(value: Any) -> bool:
    return value.node().kind() == "prim::ListConstruct" and str(value.type()) == "List[Tensor]"


def _reference(inputs: list[Any]) -> tuple[str, Any] | None:
    """The helper and the tensor attribute whose dtype the other inputs take: a direct input
    (``aten::conv1d(x, self.weight, ...)``), an item of a list built in the graph (a traced
    ``aten::lstm(x, hx, [w_ih, w_hh, ...])``) or a list attribute (a scripted LSTM's
    ``self._flat_weights``)."""
    direct = [v for v in inputs if _attr_tensor(v)]
    built = [i for v in inputs if _tensor_list_build(v) for i in v.node().inputs()]
    built = [i for i in built if _attr_tensor(i)]
    if direct or built:
        return "_like", (direct or built)[0]
    lists = [v for v in inputs if _attr_tensor_list(v)]
    return ("_like_list", lists[0]) if lists else None


def insert_weight_casts(graph: Any) -> int:
    """Before each operator of ``graph`` that takes a tensor attribute, cast its other floating
    tensor inputs (and the tensors of a list input built in the graph, e.g. an LSTM cell's
    ``[h, c]``) to that attribute's dtype at run time. Returns the number of casts inserted.
    """
    count = 0
    for node in list(_nodes(graph)):
        if node.kind() in _SKIP:
            continue
        inputs = list(node.inputs())
        found = _reference(inputs)
        if found is None:
            continue
        helper, ref = found
        for i, value in enumerate(inputs):
            if _attr_tensor(value) or _attr_tensor_list(value):
                continue
            if _kind(value) == "TensorType":
                node.replaceInput(i, _cast_before(graph, node, helper, [value, ref]))
                count += 1
            elif _tensor_list_build(value):
                build = value.node()
                for j, item in enumerate(list(build.inputs())):
                    if not _attr_tensor(item):
                        build.replaceInput(j, _cast_before(graph, build, helper, [item, ref]))
                        count += 1
    return count


def restore_outputs(graph: Any) -> int:
    """Cast each FP16/BF16 tensor that ``graph`` returns (directly, or inside a tuple or list
    built in the graph) back to FP32 at run time. Returns the number of casts inserted."""
    count = 0

    def fix(node: Any) -> None:
        nonlocal count
        for i, value in enumerate(list(node.inputs())):
            producer = value.node().kind()
            if _kind(value) == "TensorType":
                node.replaceInput(i, _cast_before(graph, node, "_restore", [value]))
                count += 1
            elif producer in ("prim::TupleConstruct", "prim::ListConstruct"):
                fix(value.node())

    fix(graph.return_node())
    return count


def cast_graphs(module: Any) -> dict[str, Any]:
    """Inline and patch every method of the top-level scripted ``module`` (in place).

    Returns ``{"methods": [...], "weightCasts": n, "outputCasts": n}`` for the report.
    """
    torch = require_torch()
    names = list(module._c._method_names())
    graphs = [module._c._get_method(name).graph for name in names]
    for graph in graphs:  # all inlined first, so no method inlines an already patched one
        torch._C._jit_pass_inline(graph)
    weight = sum(insert_weight_casts(g) for g in graphs)
    output = sum(restore_outputs(g) for g in graphs)
    for graph in graphs:
        torch._C._jit_pass_lint(graph)
    return {"methods": names, "weightCasts": weight, "outputCasts": output}
