"""Weight-only INT8 on hostile or unusual models: a name the pass would write is already in
the model, weights that no scale holds (NaN, Inf, near the float32 maximum), a weight read
inside a subgraph, IR version 3, and what counts as weight-only INT8 when a model is checked
for being quantized already."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kquant_job.passes.int8_attempts import refuse_quantized
from kquant_job.passes.int8_weight_only import (
    count_weight_only,
    quantize_symmetric,
    store_weights_int8,
)

RNG = np.random.default_rng(1)
F = TensorProto.FLOAT
X = RNG.normal(0, 1, (1, 16, 12, 12)).astype(np.float32)
OUT = [1, 32, 12, 12]


def weight(scale: float = 0.1) -> np.ndarray:
    return RNG.normal(0, scale, (32, 16, 3, 3)).astype(np.float32)


def model(nodes, inits, outputs=None, inputs=None, ir: int = 8, opset: int = 13):
    graph = helper.make_graph(
        nodes, "net",
        [helper.make_tensor_value_info("x", F, [1, 16, 12, 12]), *(inputs or [])],
        outputs or [helper.make_tensor_value_info("a", F, OUT)],
        inits,
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    onnx.checker.check_model(m, full_check=True)
    return m


def conv(w: str, out: str = "a", name: str = "c1"):
    return helper.make_node("Conv", ["x", w], [out], name=name, pads=[1, 1, 1, 1])


def run(m: onnx.ModelProto, feeds=None, optimized: Path | None = None) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(m.SerializeToString(), opts, ["CPUExecutionProvider"])
    return sess.run(None, {"x": X, **(feeds or {})})


def assert_stored_faithfully(before: onnx.ModelProto, after: onnx.ModelProto, tmp_path: Path):
    """Valid, loaded, outputs within INT8 rounding, and folded back to the float graph."""
    onnx.checker.check_model(after, full_check=True)
    old = run(before, optimized=tmp_path / "fp32.onnx")
    new = run(after, optimized=tmp_path / "w8.onnx")
    for a, b in zip(old, new, strict=True):
        assert np.max(np.abs(a - b)) <= 0.02 * np.max(np.abs(a))
    ops = [sorted(n.op_type for n in onnx.load(str(tmp_path / f)).graph.node)
           for f in ("fp32.onnx", "w8.onnx")]  # fmt: skip
    assert ops[0] == ops[1]


def test_a_weight_named_like_another_weights_int8_copy_is_not_shadowed(tmp_path: Path):
    """Weights ``w`` and ``w_kquant_w8``: the INT8 copy of ``w`` took the name of the second
    weight, whose restored float had the same name, and onnxruntime loaded the model with
    conv1 reading conv2's weight (output error 100%, no error raised)."""
    nodes = [conv("w"), conv("w_kquant_w8", "b", "c2")]
    inits = [
        numpy_helper.from_array(weight(), "w"),
        numpy_helper.from_array(weight(), "w_kquant_w8"),
    ]
    outputs = [helper.make_tensor_value_info(n, F, OUT) for n in ("a", "b")]
    before = model(nodes, inits, outputs)
    after = model(nodes, inits, outputs)
    assert store_weights_int8(after, ("Conv",)) == ["c1", "c2"]
    assert_stored_faithfully(before, after, tmp_path)
    assert count_weight_only(after) == 2


@pytest.mark.parametrize(
    "where", ["initializer", "scale", "node output", "graph input", "node name"]
)
def test_names_the_pass_would_write_that_the_model_holds_are_not_reused(where: str, tmp_path: Path):
    """Each used to make a model that the checker or onnxruntime refused (duplicate
    initializer, duplicate definition, two nodes with the same name)."""
    nodes, inits = [conv("w")], [numpy_helper.from_array(weight(), "w")]
    outputs, inputs, feeds = [helper.make_tensor_value_info("a", F, OUT)], [], {}
    if where in ("initializer", "scale"):
        name = "w_kquant_w8" + ("_scale" if where == "scale" else "")
        inits.append(numpy_helper.from_array(np.ones(3, np.float32), name))
        nodes.append(helper.make_node("Identity", [name], ["z"], name="id"))
        outputs.append(helper.make_tensor_value_info("z", F, [3]))
    elif where == "node output":
        nodes.append(helper.make_node("Relu", ["x"], ["w_kquant_w8_f"], name="relu"))
        outputs.append(helper.make_tensor_value_info("w_kquant_w8_f", F, [1, 16, 12, 12]))
    elif where == "graph input":
        inputs.append(helper.make_tensor_value_info("w_kquant_w8_f", F, OUT))
        nodes.append(helper.make_node("Add", ["a", "w_kquant_w8_f"], ["s"], name="add"))
        outputs = [helper.make_tensor_value_info("s", F, OUT)]
        feeds["w_kquant_w8_f"] = np.ones(OUT, np.float32)
    else:
        nodes.append(helper.make_node("Relu", ["x"], ["r"], name="w_kquant_w8_mul"))
        outputs.append(helper.make_tensor_value_info("r", F, [1, 16, 12, 12]))
    before, after = model(nodes, inits, outputs, inputs), model(nodes, inits, outputs, inputs)
    assert store_weights_int8(after, ("Conv",)) == ["c1"]
    onnx.checker.check_model(after, full_check=True)
    old, new = run(before, feeds), run(after, feeds)
    assert np.max(np.abs(old[0] - new[0])) <= 0.02 * np.max(np.abs(old[0]))
    for a, b in zip(old[1:], new[1:], strict=True):
        np.testing.assert_array_equal(a, b)
    names = [n.name for n in after.graph.node]
    assert len(names) == len(set(names))


def _poison(kind: str) -> np.ndarray:
    w = weight()
    if kind == "nan":
        w[3, 0, 0, 0] = np.nan
    elif kind == "inf":
        w[3, 0, 0, 0] = np.inf
    else:  # 127 * (max / 127) rounds past the float32 maximum: the restored weight is Inf
        w[:, 0, 0, 0] = np.finfo(np.float32).max
    return w


@pytest.mark.parametrize("kind", ["nan", "inf", "float32 max"])
def test_weights_no_scale_holds_stay_float(kind: str):
    """NaN became an arbitrary integer (the layer's output finite where the float model's is
    NaN), Inf made every other weight of its channel NaN, and a weight at the float32
    maximum was restored as Inf: each a different model, written without a word."""
    w = _poison(kind)
    m = model([conv("w")], [numpy_helper.from_array(w, "w")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-cast warning either
        assert store_weights_int8(m, ("Conv",)) == []
    (kept,) = m.graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(kept), w)
    assert [n.op_type for n in m.graph.node] == ["Conv"]


def test_huge_and_tiny_finite_weights_are_restored_within_half_a_step():
    for magnitude in (1e30, 1e-30):
        w = weight(magnitude)
        q, scale = quantize_symmetric(w)
        restored = q.astype(np.float32) * scale
        assert np.all(np.isfinite(restored))
        assert np.all(np.abs(restored - w) <= scale * 0.5001)
    # a channel whose scale underflows to 0 is stored as 0 (w / 0 made NaN, cast to int8)
    w = weight()
    w[5] = np.float32(1e-44)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, scale = quantize_symmetric(w)
    assert np.all(q[5] == 0) and scale[5, 0, 0, 0] == 1


def test_a_weight_read_inside_a_subgraph_stays_float():
    """A ReduceSum in an If branch read the main graph's weight (outer scope): it was stored
    anyway, and the branch computed on the rounded weight."""
    w = weight()
    then_g = helper.make_graph(
        [helper.make_node("ReduceSum", ["w"], ["t"], keepdims=0, name="sum")], "then", [],
        [helper.make_tensor_value_info("t", F, [])],
    )  # fmt: skip
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="id")], "else", [],
        [helper.make_tensor_value_info("e", F, [1, 16, 12, 12])],
    )  # fmt: skip
    nodes = [conv("w"), helper.make_node("If", ["c"], ["s"], then_branch=then_g,
                                         else_branch=else_g, name="if")]  # fmt: skip
    m = helper.make_model(
        helper.make_graph(
            nodes, "net",
            [helper.make_tensor_value_info("x", F, [1, 16, 12, 12]),
             helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("a", F, OUT),
             helper.make_tensor_value_info("s", F, None)],
            [numpy_helper.from_array(w, "w")],
        ),
        opset_imports=[helper.make_opsetid("", 13)],
    )  # fmt: skip
    m.ir_version = 8
    before = run(m, {"c": np.array(True)})
    assert store_weights_int8(m, ("Conv",)) == []
    after = run(m, {"c": np.array(True)})
    np.testing.assert_array_equal(before[1], after[1])


def test_a_constant_weight_in_an_ir3_model_stays_float():
    """IR 3 needs every initializer listed as a graph input (and an input is not folded):
    the INT8 copy of a Constant node's weight made the model fail the checker."""
    const = helper.make_node(
        "Constant", [], ["w"], name="k", value=numpy_helper.from_array(weight(), "w")
    )
    m = model([const, conv("w")], [], ir=3, opset=8)
    assert store_weights_int8(m, ("Conv",)) == []
    onnx.checker.check_model(m, full_check=True)


def _masked(mask_dtype: int, shape: tuple[int, ...] = (32, 16, 3, 3)) -> onnx.ModelProto:
    """A float weight times an integer mask (Cast to float) in front of a Conv: pruning."""
    mask = (RNG.random(shape) > 0.5).astype(helper.tensor_dtype_to_np_dtype(mask_dtype))
    nodes = [
        helper.make_node("Cast", ["mask"], ["mask_f"], to=F, name="cast"),
        helper.make_node("Mul", ["w", "mask_f"], ["w_masked"], name="mul"),
        conv("w_masked"),
    ]
    inits = [numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(weight(), "w")]
    return model(nodes, inits)


@pytest.mark.parametrize("mask_dtype", [TensorProto.UINT8, TensorProto.INT8])
def test_an_integer_mask_on_a_float_weight_is_not_weight_only_int8(mask_dtype: int):
    """It was counted as this pass' form and refused as AlreadyQuantized."""
    m = _masked(mask_dtype)
    assert count_weight_only(m) == 0
    refuse_quantized(m, "pruned.onnx")  # no PassError


def test_count_weight_only_counts_the_pass_output_and_survives_malformed_nodes():
    m = model([conv("w")], [numpy_helper.from_array(weight(), "w")])
    store_weights_int8(m, ("Conv",))
    assert count_weight_only(m) == 1
    # a Cast without inputs or outputs (the checker refuses it; the count must not crash)
    m.graph.node.append(helper.make_node("Cast", [], [], to=F, name="broken"))
    m.graph.node.append(helper.make_node("Mul", [], [], name="broken_mul"))
    assert count_weight_only(m) == 1
