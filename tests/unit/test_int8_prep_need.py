"""Dynamic INT8 skips onnxruntime's pre-processing only where it cannot change the result
(passes/int8_prep_need.py): graphs where folding or Conv fusions would, keep it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kquant_api import QuantizationConfig
from kquant_job.passes import PassContext
from kquant_job.passes.int8_prep_need import dynamic_unaffected
from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The graphs here are small: judged as if their weights were past the size from which
    dynamic INT8 may skip pre-processing (tested on its own below)."""
    import kquant_job.passes.int8_prep_need as need

    monkeypatch.setattr(need, "SKIP_FROM_BYTES", 0)


def _w(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes: list[onnx.NodeProto], inits: list[TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_plain_matmul_graph_is_unaffected_and_quantized_without_the_advice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model([helper.make_node("MatMul", ["x", "w"], ["z"])], [_w("w", 8, 8)])
    assert dynamic_unaffected(model)
    path = tmp_path / "mm.onnx"
    onnx.save(model, str(path))
    config = QuantizationConfig.model_validate({"precision": "int8", "strict": True})
    with caplog.at_level(logging.WARNING):
        result = OnnxInt8DynamicPass().run(path, config, tmp_path / "o.onnx", PassContext(tmp_path))
    assert result.details["preprocess"].startswith("skipped: no Conv")
    assert result.details["quantizedNodes"] > 0
    # onnxruntime's "Please consider to run pre-processing" is not the user's to act on
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]


@pytest.mark.parametrize(
    "nodes, inits",
    [
        # a weight behind an Identity (an exporter's tied weights): folded into an initializer
        ([helper.make_node("Identity", ["w0"], ["w"]), helper.make_node("MatMul", ["x", "w"],
          ["z"])], [_w("w0", 8, 8)]),
        # a weight in a Constant node
        ([helper.make_node("Constant", [], ["w"], value=_w("c", 8, 8)),
          helper.make_node("MatMul", ["x", "w"], ["z"])], []),
        # a transposed weight: Transpose of an initializer
        ([helper.make_node("Transpose", ["w0"], ["w"], perm=[1, 0]),
          helper.make_node("MatMul", ["x", "w"], ["z"])], [_w("w0", 8, 8)]),
        # a Gather of a table at constant indices: folded away, table and all
        ([helper.make_node("Constant", [], ["i"], value=numpy_helper.from_array(
            np.array([0, 1], np.int64), "i")), helper.make_node("Gather", ["t", "i"], ["g"]),
          helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "g"],
          ["z"])], [_w("t", 4, 8), _w("w", 8, 8)]),
        # a Conv: its fusions change what ConvInteger keeps apart
        ([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Reshape", ["y",
          "s"], ["y4"]), helper.make_node("Conv", ["y4", "k"], ["z"])],
         [_w("w", 8, 8), numpy_helper.from_array(np.array([1, 1, 1, 8], np.int64), "s"),
          _w("k", 1, 1, 1, 1)]),
        # nothing to quantize: the pass says so after pre-processing
        ([helper.make_node("Relu", ["x"], ["z"])], []),
    ],
    ids=["identity", "constant", "transpose", "gather-folded", "conv", "no-dense-op"],
)  # fmt: skip
def test_graphs_pre_processing_changes_keep_it(
    nodes: list[onnx.NodeProto], inits: list[TensorProto]
) -> None:
    assert dynamic_unaffected(_model(nodes, inits)) is None


def test_a_bias_behind_an_identity_and_a_gather_of_an_activation_are_no_weights() -> None:
    nodes = [
        helper.make_node("Identity", ["b0"], ["b"]),  # a deduplicated bias: stays float anyway
        helper.make_node("Gemm", ["x", "w", "b"], ["y"]),
        helper.make_node("Constant", [], ["i"], value=numpy_helper.from_array(
            np.array(0, np.int64), "i")),
        helper.make_node("Gather", ["y", "i"], ["z"], axis=1),  # data is an activation
    ]  # fmt: skip
    assert dynamic_unaffected(_model(nodes, [_w("w", 8, 8), _w("b0", 8)]))


def test_a_cycle_in_a_hostile_graph_ends() -> None:
    nodes = [
        helper.make_node("Add", ["w0", "b"], ["a"]),
        helper.make_node("Identity", ["a"], ["b"]),  # a feeds b feeds a
        helper.make_node("MatMul", ["x", "a"], ["z"]),
    ]
    assert dynamic_unaffected(_model(nodes, [_w("w0", 8, 8)])) is not None


def test_a_small_model_keeps_its_pre_processing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheap there, and its folding of shape arithmetic still pays (the corpus's LSTM/GRU:
    1.1x its original's latency pre-processed, 1.7x not)."""
    import kquant_job.passes.int8_prep_need as need

    model = _model([helper.make_node("MatMul", ["x", "w"], ["z"])], [_w("w", 8, 8)])
    assert need.weight_bytes(model) == 8 * 8 * 4
    monkeypatch.setattr(need, "SKIP_FROM_BYTES", 8 * 8 * 4 + 1)
    assert dynamic_unaffected(model) is None
    monkeypatch.setattr(need, "SKIP_FROM_BYTES", 8 * 8 * 4)
    assert dynamic_unaffected(model)
