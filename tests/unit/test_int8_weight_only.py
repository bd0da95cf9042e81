"""Weight-only INT8 for the Conv layers that INT8 dynamic computes in float: the weights are
stored in 8 bits and restored by Cast and Mul, which onnxruntime folds when the session is
created, so the model it runs is the float graph (FP32's speed) while the file shrinks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kquant_api import QuantizationConfig, Reason
from kquant_job.errors import PassError
from kquant_job.passes import PassContext
from kquant_job.passes.base import ProbeResult
from kquant_job.passes.int8_attempts import count_quantized, refuse_quantized
from kquant_job.passes.int8_weight_only import quantize_symmetric, store_weights_int8
from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass

RNG = np.random.default_rng(0)


def conv_net(constant_weight: bool = False, opset: int = 13) -> onnx.ModelProto:
    """x (1, 16, 24, 24) -> Conv(32, 3x3) -> Relu -> Conv(32, 3x3) -> y; float32."""
    w1 = RNG.normal(0, 0.1, (32, 16, 3, 3)).astype(np.float32)
    w2 = RNG.normal(0, 0.1, (32, 32, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(np.zeros(32, np.float32), "b1")]
    if constant_weight:
        nodes.insert(0, helper.make_node("Constant", [], ["w2"], name="const_w2",
                                         value=numpy_helper.from_array(w2, "w2")))  # fmt: skip
    else:
        inits.append(numpy_helper.from_array(w2, "w2"))
    inits.append(numpy_helper.from_array(w1, "w1"))
    graph = helper.make_graph(
        nodes, "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 24, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 24, 24])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what onnxruntime 1.31 loads
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, x: np.ndarray, optimized: Path | None = None) -> np.ndarray:
    opts = ort.SessionOptions()
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(model.SerializeToString(), opts, ["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))


def test_symmetric_per_channel_quantization_round_trips_within_half_a_step():
    w = RNG.normal(0, 1, (8, 4, 3, 3)).astype(np.float32)
    w[3] = 0  # an all-zero channel keeps scale 1 (no division by zero)
    q, scale = quantize_symmetric(w)
    assert q.dtype == np.int8 and scale.shape == (8, 1, 1, 1) and scale[3, 0, 0, 0] == 1
    assert q.min() >= -127 and np.abs(q).reshape(8, -1).max(axis=1)[[0, 1, 2]].tolist() == [127] * 3
    assert np.all(np.abs(q * scale - w) <= scale / 2 + 1e-7)


def test_stored_weights_shrink_the_file_and_fold_back_to_the_float_graph(tmp_path: Path):
    model = conv_net()
    x = RNG.normal(0, 1, (1, 16, 24, 24)).astype(np.float32)
    before = run(model, x, tmp_path / "fp32_opt.onnx")
    size = len(model.SerializeToString())
    layers = store_weights_int8(model, ("Conv",))
    assert layers == ["conv1", "conv2"]
    onnx.checker.check_model(model, full_check=True)
    assert len(model.SerializeToString()) < 0.3 * size
    after = run(model, x, tmp_path / "w8_opt.onnx")
    assert cosine(before, after) > 0.9999
    assert np.max(np.abs(before - after)) < 0.05 * np.max(np.abs(before))
    # onnxruntime folded Cast and Mul: the graph it runs is FP32's, node for node
    ops = [
        sorted(n.op_type for n in onnx.load(str(tmp_path / f"{n}_opt.onnx")).graph.node)
        for n in ("fp32", "w8")
    ]
    assert ops[0] == ops[1] and "Cast" not in ops[1] and "Mul" not in ops[1]
    counts = count_quantized(model)
    assert counts["weightOnlyLayers"] == 2 and counts["quantizedConv"] == 0


def test_a_constant_node_weight_is_stored_too():
    model = conv_net(constant_weight=True)
    assert store_weights_int8(model, ("Conv",)) == ["conv1", "conv2"]
    assert not [n for n in model.graph.node if n.op_type == "Constant"]
    onnx.checker.check_model(model, full_check=True)


def test_weights_that_are_not_only_conv_weights_or_are_small_stay_float():
    model = conv_net()
    # w2 is also a graph output: someone reads it as it is
    model.graph.output.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, None))
    assert store_weights_int8(model, ("Conv",)) == ["conv1"]
    model = conv_net()
    model.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, None))
    assert store_weights_int8(model, ("Conv",)) == ["conv2"]  # an overridable input
    model = conv_net()
    assert store_weights_int8(model, ("Conv",), exclude=("conv2",)) == ["conv1"]
    tiny = conv_net()
    for init in tiny.graph.initializer:
        if init.name == "w1":
            init.CopyFrom(numpy_helper.from_array(np.ones((4, 16, 3, 3), np.float32), "w1"))
    assert "conv1" not in store_weights_int8(tiny, ("Conv",))  # 576 elements: not worth it


class SlowConvProbe:
    """Every candidate within tolerance; a timed one with INT8 Conv 3x slower."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, candidate: Path, *, timed: bool = False, keep: bool = False) -> ProbeResult:
        counts = count_quantized(onnx.load(str(candidate)))
        self.calls.append("int8conv" if counts["quantizedConv"] else "float conv")
        result = ProbeResult(ok=True, violations=[])
        if timed:
            result.latency = {"original": 10.0, "quantized": 30.0, "runs": 20}
            result.slower = counts["quantizedConv"] > 0
        return result


def test_a_conv_net_whose_conv_integer_is_slow_gets_its_weights_stored_int8(tmp_path: Path):
    """No dense op to fall back to: before, the slow ConvInteger candidate was returned and
    validation called it NoGain (PP-OCR det, NudeNet, ddddocr det: 2.6-3.5x slower)."""
    src = tmp_path / "net.onnx"
    onnx.save(conv_net(), str(src))
    probe = SlowConvProbe()
    ctx = PassContext(work_dir=tmp_path / "work", probe=probe)
    ctx.work_dir.mkdir()
    out = tmp_path / "out" / "net.onnx"
    cfg = QuantizationConfig.model_validate({"precision": "int8"})
    details = OnnxInt8DynamicPass().run(src, cfg, out, ctx).details
    labels = [a["attempt"] for a in details["attempts"]]
    assert labels[0] == "requested" and details["attempts"][0]["slower"] is True
    assert details["chosenAttempt"] == "convWeightsOnly" == labels[-1]
    assert details["attempts"][-1]["integerOps"] is False
    assert probe.calls[-1] == "float conv"
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "ConvInteger" not in ops and "DynamicQuantizeLinear" not in ops
    assert details["weightOnlyLayers"] == 2
    assert out.stat().st_size < 0.3 * src.stat().st_size
    # and kquant's own weight-only output is not quantized again
    with pytest.raises(PassError) as info:
        refuse_quantized(onnx.load(str(out)), "net_int8.onnx")
    assert info.value.reason is Reason.AlreadyQuantized
    assert "weight-only Conv x2" in str(info.value)
