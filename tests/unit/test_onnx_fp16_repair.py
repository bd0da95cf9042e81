"""The FP16 pass on small graphs built to break FP16: values beyond 65504, overflowing
activations, ops without FP16 support; repair steps, bounds and failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from fp16_helpers import (
    batchnorm_model,
    celu_model,
    convert,
    make_probe,
    overflow_model,
    rel_error,
    run,
    save,
)
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from kquant_api import QuantizationConfig, Reason
from kquant_job.errors import PassError
from kquant_job.passes import ProbeResult


def test_batchnorm_variance_beyond_fp16_stays_fp32(tmp_path: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = batchnorm_model(tmp_path / "bn.onnx")
    feeds = {"x": np.random.default_rng(0).uniform(100, 3000, (1, 3, 4, 4)).astype(np.float32)}
    ref = run(model, feeds)[0]
    plain = convert_float_to_float16(onnx.load(str(model)), keep_io_types=True)
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    plain_out = run(tmp_path / "plain.onnx", feeds)[0]
    assert not np.allclose(plain_out, ref, rtol=0.1)  # var clamped to 65504

    result = convert(model, tmp_path)
    assert result.details["fp32Initializers"] == {"var": 1e7}
    assert result.details["nodeBlockList"] == ["bn"]
    inits = {i.name: i.data_type for i in onnx.load(str(result.output)).graph.initializer}
    assert inits["var"] == TensorProto.FLOAT and inits["w"] == TensorProto.FLOAT16
    np.testing.assert_allclose(run(result.output, feeds)[0], ref, rtol=2e-3)


def test_constant_beyond_fp16_in_subgraph_stays_fp32(tmp_path: Path) -> None:
    big = helper.make_tensor("c", TensorProto.FLOAT, [1], [2e5])
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=big, name="big"),
         helper.make_node("Div", ["x", "c"], ["t"], name="div")],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [8])],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"], name="neg")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [8])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="if")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])],
    )  # fmt: skip
    model = save(graph, tmp_path / "if.onnx")
    feeds = {"x": np.linspace(50, 150, 8, dtype=np.float32), "cond": np.array(True)}
    result = convert(model, tmp_path, probe=make_probe(model, feeds, tol=1e-3))
    assert result.details["fp32Initializers"] == {"c": 2e5}
    assert {"big", "div"} <= set(result.details["nodeBlockList"])
    assert result.details["attempts"] == [{"step": "convert", "added": [], "outcome": "ok"}]
    np.testing.assert_allclose(run(result.output, feeds)[0], feeds["x"] / 2e5, rtol=1e-3)


def test_overflow_repaired_by_blocking_fragile_ops(tmp_path: Path) -> None:
    model = overflow_model(tmp_path / "overflow.onnx")
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)}
    result = convert(model, tmp_path, probe=make_probe(model, feeds, fp16=True))
    steps = [(a["step"], a["added"]) for a in result.details["attempts"]]
    assert steps == [
        ("convert", []),
        ("fragile-ops", ["op:Pow", "op:Sqrt"]),
        ("fragile-ops", ["op:ReduceMean"]),
    ]
    assert "inf" in result.details["attempts"][0]["outcome"]
    assert {"Pow", "Sqrt", "ReduceMean"} <= set(result.details["opBlockList"])
    assert "Mul" not in result.details["opBlockList"]
    assert result.details["repaired"] is True
    ref = run(model, feeds)[0]
    got = ReferenceEvaluator(str(result.output)).run(None, feeds)[0]
    assert rel_error(ref, got) < 1e-2


def test_bisection_finds_the_nodes_to_keep(tmp_path: Path) -> None:
    """(x * 1000 + 64000) - 64000: no fragile op type, the Add/Sub pair must stay FP32."""
    inits = [numpy_helper.from_array(np.array(v, np.float32), n)
             for n, v in (("k", 1e3), ("offset", 64000.0))]  # fmt: skip
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["a"], name="scale"),
        helper.make_node("Add", ["a", "offset"], ["b"], name="shift"),
        helper.make_node("Sub", ["b", "offset"], ["y"], name="unshift"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])
    model = save(helper.make_graph(nodes, "g", [x], [y], inits), tmp_path / "shift.onnx")
    feeds = {"x": np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)}
    result = convert(model, tmp_path, probe=make_probe(model, feeds, fp16=True))
    assert result.details["nodeBlockList"] == ["shift", "unshift"]
    assert [a["step"] for a in result.details["attempts"]][:2] == ["convert", "bisect"]
    got = ReferenceEvaluator(str(result.output)).run(None, feeds)[0]
    assert rel_error(run(model, feeds)[0], got) < 1e-2


def test_load_error_repaired_without_probe(tmp_path: Path) -> None:
    model = celu_model(tmp_path / "celu.onnx")
    result = convert(model, tmp_path)
    attempts = result.details["attempts"]
    assert "Celu" in attempts[0]["outcome"]
    assert attempts[1:] == [{"step": "load-error", "added": ["node:celu"], "outcome": "ok"}]
    assert result.details["nodeBlockList"] == ["celu"]
    feeds = {"x": np.linspace(-3, 3, 16, dtype=np.float32).reshape(2, 8)}
    assert rel_error(run(model, feeds)[0], run(result.output, feeds)[0]) < 1e-3


def test_repair_off_fails_instead_of_writing_a_broken_model(tmp_path: Path) -> None:
    model = celu_model(tmp_path / "celu.onnx")
    with pytest.raises(PassError) as err:
        convert(model, tmp_path, config=QuantizationConfig(precision="fp16", repair=False))
    assert err.value.reason is Reason.ConversionFailed
    assert "repair is off" in str(err.value) and "Celu" in str(err.value)
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_unrepairable_model_ends_in_conversion_failed(tmp_path: Path) -> None:
    """With FP16 inputs (keepIoTypes false) 1e5 is inf before any node runs."""
    model = overflow_model(tmp_path / "overflow.onnx")
    feeds = {"x": np.full((4, 64), 1e5, np.float32)}
    config = QuantizationConfig(precision="fp16", keepIoTypes=False)
    with pytest.raises(PassError) as err:
        convert(model, tmp_path, config=config, probe=make_probe(model, feeds))
    assert err.value.reason is Reason.ConversionFailed
    message = str(err.value)
    assert "fragile-ops" in message and "every node FP32" in message and "last error" in message
    assert [a["step"] for a in err.value.detail["attempts"]][-1] == "bisect"
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_attempts_are_bounded(tmp_path: Path) -> None:
    model = overflow_model(tmp_path / "overflow.onnx")
    never = lambda _, **__: ProbeResult(ok=False, violations=["y: always"])  # noqa: E731
    with pytest.raises(PassError) as err:
        convert(model, tmp_path, probe=never, max_attempts=2)
    assert len(err.value.detail["attempts"]) == 2
    assert "budget" in str(err.value)
