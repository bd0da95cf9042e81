"""Pre-processing is skipped for If/Loop bodies nested past MAX_PREPROCESS_DEPTH: onnxruntime's
shape inference doubled its time with each level (a 3 KB model of 25 nested Ifs ran past 200 s
in a hostile-input trial)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kquant_api import QuantizationConfig, Reason
from kquant_api.spec import Preprocess
from kquant_job.errors import PassError
from kquant_job.passes import PassContext
from kquant_job.passes.int8_prepare import MAX_PREPROCESS_DEPTH, prepare, subgraph_depth
from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass


def _branch(name: str, nodes: list, out: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, 1, [1, 4])])


def nested_ifs(path: Path, depth: int) -> Path:
    """``depth`` Ifs nested in each other's then-branch around a MatMul's input."""
    body = _branch("g0", [helper.make_node("Identity", ["x"], ["y0"])], "y0")
    for i in range(1, depth):
        other = _branch(f"e{i}", [helper.make_node("Identity", ["x"], [f"e{i}"])], f"e{i}")
        node = helper.make_node("If", ["c"], [f"y{i}"], then_branch=body, else_branch=other)
        body = _branch(f"g{i}", [node], f"y{i}")
    weights = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    flag = numpy_helper.from_array(np.array(True), "c")
    other = _branch("e", [helper.make_node("Identity", ["x"], ["e"])], "e")
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["z"], then_branch=body, else_branch=other),
         helper.make_node("MatMul", ["z", "W"], ["out"])], "top",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])], [weights, flag],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_the_depth_counts_nested_bodies(tmp_path: Path) -> None:
    for depth in (1, 3, 25):
        model = onnx.load(str(nested_ifs(tmp_path / f"d{depth}.onnx", depth)))
        assert subgraph_depth(model.graph) == depth


def test_a_deep_nest_skips_pre_processing_and_still_quantizes(tmp_path: Path) -> None:
    model = nested_ifs(tmp_path / "deep.onnx", 25)
    ctx = PassContext(work_dir=tmp_path / "work")
    ctx.work_dir.mkdir()
    out = tmp_path / "out" / "q.onnx"
    details = (
        OnnxInt8DynamicPass().run(model, QuantizationConfig(precision="int8"), out, ctx).details
    )
    assert details["preprocess"].startswith("skipped: subgraphs nested 25 deep")
    assert details["quantizedNodes"] > 0 and out.is_file()
    shallow = nested_ifs(tmp_path / "shallow.onnx", MAX_PREPROCESS_DEPTH)
    assert not prepare(shallow, tmp_path / "w2").details["preprocess"].startswith("skipped")
    with pytest.raises(PassError, match="nested 25 deep") as info:
        prepare(model, tmp_path / "w3", Preprocess.always)
    assert info.value.reason is Reason.ConversionFailed
