"""Activation ranges of an FP32 model (validate/ranges.py) and how the FP16 pass uses them
(passes/onnx_fp16_ranges.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kquant_job.passes.onnx_fp16_ranges import scan_activations
from kquant_job.validate.ranges import activation_ranges

CPU = ["CPUExecutionProvider"]
F = TensorProto.FLOAT


def _save(graph: onnx.GraphProto, path: Path, *, external: bool = False) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=external, size_threshold=0,
              location="w.bin")  # fmt: skip
    return path


def _loud(path: Path, *, external: bool = False) -> Path:
    """x (1, 4) -> MatMul W (x1000) -> Pow 2 -> ReduceMean -> Sqrt -> y; plus Log of x,
    -inf at x = 0."""
    w = (np.eye(4, dtype=np.float32) * 1000).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["big"], name="mm"),
            helper.make_node("Pow", ["big", "two"], ["sq"], name="pow"),
            helper.make_node("ReduceMean", ["sq"], ["mean"], name="mean", keepdims=1),
            helper.make_node("Sqrt", ["mean"], ["y"], name="sqrt"),
            helper.make_node("Log", ["x"], ["logx"], name="log"),
        ],
        "loud",
        [helper.make_tensor_value_info("x", F, [1, 4])],
        [helper.make_tensor_value_info("y", F, [1, 1]),
         helper.make_tensor_value_info("logx", F, [1, 4])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(2, np.float32), "two")],
    )  # fmt: skip
    return _save(graph, path, external=external)


@pytest.mark.parametrize("external", [False, True])
def test_ranges_are_the_max_magnitude_of_every_float_value(tmp_path: Path, external: bool) -> None:
    model = _loud(tmp_path / "m.onnx", external=external)
    feeds = [
        {"x": np.array([[0.5, -2.0, 1.0, 0.0]], np.float32)},
        {"x": np.array([[3.0, 0.1, -0.2, 1.0]], np.float32)},
        {"x": np.array([[9.0, 9.0, 9.0, 9.0]], np.float32)},  # beyond max_samples
    ]
    got = activation_ranges(model, feeds, {}, CPU, max_samples=2)
    xs = np.concatenate([f["x"] for f in feeds[:2]])
    big = xs * 1000
    expected = {
        "x": 3.0,
        "big": 3000.0,
        "sq": 9e6,
        "mean": float(np.max((big**2).mean(axis=1))),
        "y": float(np.max(np.sqrt((big**2).mean(axis=1)))),
        "logx": float(np.max(np.abs(np.log(np.abs(xs[xs != 0]))))),  # -inf left out
    }
    assert got.keys() == expected.keys()  # initializers are not activations
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name


def test_feedback_threads_the_state_through_the_stream(tmp_path: Path) -> None:
    """state_out = state_in + x: over a stream the state grows, as it does in production."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["state_in", "x"], ["state_out"], name="add")],
        "acc",
        [helper.make_tensor_value_info("x", F, [1, 2]),
         helper.make_tensor_value_info("state_in", F, [1, 2])],
        [helper.make_tensor_value_info("state_out", F, [1, 2])],
    )  # fmt: skip
    model = _save(graph, tmp_path / "acc.onnx")
    one = {"x": np.full((1, 2), 20000.0, np.float32), "state_in": np.zeros((1, 2), np.float32)}
    streamed = activation_ranges(model, [one] * 4, {"state_out": "state_in"}, CPU)
    assert streamed["state_out"] == 80000.0 and streamed["state_in"] == 60000.0
    separate = activation_ranges(model, [one] * 4, {}, CPU)
    assert separate["state_out"] == 20000.0


def test_values_inside_subgraphs_are_not_measured(tmp_path: Path) -> None:
    then = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["inner"], name="mul")],
        "then", [], [helper.make_tensor_value_info("inner", F, [1, 2])],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["inner2"], name="neg")],
        "else", [], [helper.make_tensor_value_info("inner2", F, [1, 2])],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)],
        "g",
        [helper.make_tensor_value_info("x", F, [1, 2]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F, [1, 2])],
    )  # fmt: skip
    model = _save(graph, tmp_path / "if.onnx")
    feed = {"x": np.full((1, 2), 300.0, np.float32), "cond": np.array(True)}
    assert activation_ranges(model, [feed], {}, CPU) == {"x": 300.0, "y": 90000.0}


def test_scan_blocks_producer_and_readers_of_values_beyond_half_the_fp16_range(
    tmp_path: Path,
) -> None:
    model = onnx.load(str(_loud(tmp_path / "m.onnx")))
    ranges = {"x": 3.0, "big": 3000.0, "sq": 9e6, "mean": 4.0e4, "y": 200.0, "logx": 2.0}
    found, block = scan_activations(model, ranges)
    assert found == {"sq": 9e6, "mean": 4.0e4}  # 4e4 > 65504 / 2: no headroom left
    assert block == {"pow", "mean", "sqrt"}
    assert scan_activations(model, ranges, headroom=1.0) == ({"sq": 9e6}, {"pow", "mean"})
    assert scan_activations(model, {}) == ({}, set())


def test_fp16_pass_goes_on_when_ranges_cannot_be_measured(tmp_path: Path) -> None:
    """A measurement that fails (the model cannot run on the samples, say) is reported and
    leaves the ladder's probe as the only check; the conversion itself goes on."""
    from kquant_api import QuantizationConfig
    from kquant_job.passes import PassContext
    from kquant_job.passes.onnx_fp16 import OnnxFp16Pass

    def broken() -> dict[str, float]:
        raise RuntimeError("sample 0: bad input shape")

    model = _loud(tmp_path / "m.onnx")
    ctx = PassContext(work_dir=tmp_path / "w", activation_ranges=broken)
    out = tmp_path / "out.onnx"
    result = OnnxFp16Pass().run(model, QuantizationConfig(precision="fp16"), out, ctx)
    assert result.details["activationRanges"] == "failed: sample 0: bad input shape"
    assert result.details["fp32Activations"] == {} and out.exists()
