"""INT8 passes on small real graphs built with onnx.helper: pre-processing fallbacks,
external data, op-type handling, and every classified error (CorruptModel, InvalidSpec,
ConversionFailed)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import silero_onnx_variants
from onnx import TensorProto, helper, numpy_helper

from kquant_api import QuantizationConfig, Reason
from kquant_job.errors import InvalidSpec, PassError
from kquant_job.passes import PassContext
from kquant_job.passes.onnx_common import iter_nodes
from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass
from kquant_job.passes.onnx_int8_static import OnnxInt8StaticPass
from kquant_job.validate.runtime import make_session

RNG = np.random.default_rng(0)


def weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def save(graph: onnx.GraphProto, path: Path, opset: int = 17, **kw: object) -> Path:
    """Save ``graph`` as a model onnxruntime accepts (IR version 8)."""
    imports = [helper.make_opsetid("", opset), *kw.pop("extra_opsets", [])]  # type: ignore[misc]
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    onnx.save(model, str(path), **kw)  # type: ignore[arg-type]
    return path


def mlp(path: Path, tail: list[onnx.NodeProto], opset: int = 17, **kw: object) -> Path:
    """x (1, 64) -> MatMul(64x64 weight) -> y -> ``tail`` nodes -> z."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), *tail]
    inits = [weight("w", 64, 64), *kw.pop("inits", [])]  # type: ignore[misc]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        inits,
    )
    return save(graph, path, opset, **kw)


def ops(path: Path) -> list[str]:
    return [n.op_type for _, n in iter_nodes(onnx.load(str(path)).graph)]


def run_model(path: Path, x: np.ndarray) -> np.ndarray:
    return make_session(path, ["CPUExecutionProvider"]).run(None, {"x": x})[0]


def dynamic(model: Path, tmp_path: Path, **kw: object) -> tuple[Path, dict]:
    config = QuantizationConfig.model_validate({"precision": "int8", **kw})
    result = OnnxInt8DynamicPass().run(
        model, config, tmp_path / "out" / model.name, PassContext(tmp_path / "w")
    )
    return result.output, result.details


@pytest.fixture
def preprocessing_wanted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamic INT8 pre-processes these small MLPs as a model that needs it (a Conv, a
    weight folded from constants): their pre-processing is what is tested."""
    import kquant_job.passes.int8_prepare as int8_prepare

    monkeypatch.setattr(int8_prepare, "dynamic_unaffected", lambda _model: None)


@pytest.mark.usefixtures("preprocessing_wanted")
def test_preprocess_skipped_when_quant_pre_process_fails(tmp_path: Path) -> None:
    # An opset-9 Upsample: quant_pre_process swaps it for Resize (absent before opset 10)
    # and onnx's version converter then fails; quantize_dynamic itself handles the model.
    shape = numpy_helper.from_array(np.array([1, 1, 8, 8], np.int64), "shape")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    tail = [
        helper.make_node("Reshape", ["y", "shape"], ["y4"]),
        helper.make_node("Upsample", ["y4", "scales"], ["z"], mode="nearest", name="up"),
    ]
    model = mlp(tmp_path / "up9.onnx", tail, opset=9, inits=[shape, scales])
    out, details = dynamic(model, tmp_path)
    assert details["preprocess"] == "skipped"
    assert "Resize" in details["preprocessError"]
    assert "MatMulInteger" in ops(out) and details["quantizedNodes"] > 0
    x = RNG.standard_normal((1, 64)).astype(np.float32)
    ref, got = run_model(model, x), run_model(out, x)
    assert got.shape == ref.shape == (1, 1, 16, 16)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # 8-bit weights: ~1 % error


@pytest.mark.usefixtures("preprocessing_wanted")
def test_preprocess_retried_without_symbolic_shape_inference(tmp_path: Path) -> None:
    # Symbolic shape inference gives up on ai.onnx.ml ops; the retry without it works.
    tail = [
        helper.make_node("Scaler", ["y"], ["z"], domain="ai.onnx.ml", offset=[0.0], scale=[2.0])
    ]
    ml = [helper.make_opsetid("ai.onnx.ml", 1)]
    model = mlp(tmp_path / "scaler.onnx", tail, extra_opsets=ml)
    _, details = dynamic(model, tmp_path)
    assert details["preprocess"] == "applied"
    assert details["preprocessSkipped"] == ["symbolicShapeInference"]
    assert "symbolic shape inference" in details["preprocessError"].lower()
    assert details["quantizedOps"]["MatMulInteger"] == 1


def test_external_data_in_external_data_out(tmp_path: Path) -> None:
    model = mlp(
        tmp_path / "ext.onnx",
        [helper.make_node("Relu", ["y"], ["z"])],
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    out, details = dynamic(model, tmp_path)
    assert (out.parent / "ext.onnx.data").stat().st_size > 0
    assert "MatMulInteger" in ops(out) and details["int8Initializers"] >= 2
    assert not list(out.parent.glob(".*.tmp"))
    x = RNG.standard_normal((1, 64)).astype(np.float32)
    assert np.abs(run_model(out, x) - run_model(model, x)).max() < 0.5


def test_gemm_in_op_types_is_quantized_and_nothing_quantized_fails(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["z"], name="fc", transB=1)],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 32])],
        [weight("w", 32, 64)],
    )
    model = save(graph, tmp_path / "gemm.onnx")
    out, details = dynamic(model, tmp_path, opTypesToQuantize=["Gemm"])
    assert details["quantizedOps"].get("MatMulInteger") == 1 and details["warnings"] == []
    assert "MatMulInteger" in ops(out)
    with pytest.raises(PassError) as err:
        dynamic(model, tmp_path / "conv", opTypesToQuantize=["Conv"])
    assert err.value.reason is Reason.ConversionFailed
    assert "no node of gemm.onnx was quantized" in str(err.value)


def test_shared_outer_weight_in_two_branches_is_conversion_failed(tmp_path: Path) -> None:
    # onnxruntime's ConvInteger looks for a subgraph Conv's weight in that subgraph only;
    # one weight used by both branches cannot be moved into either.
    def branch(name: str) -> onnx.GraphProto:
        node = helper.make_node("Conv", ["x", "w", "b"], [f"{name}_y"], name=f"{name}_conv")
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 4, 8])
        return helper.make_graph([node], name, [], [out])

    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["z"], then_branch=branch("t"), else_branch=branch("e"))],
        "shared",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8])],
        [weight("w", 4, 2, 1), weight("b", 4)],
    )
    model = save(graph, tmp_path / "shared.onnx")
    with pytest.raises(PassError) as err:
        dynamic(model, tmp_path)
    assert err.value.reason is Reason.ConversionFailed
    assert "shared.onnx" in str(err.value) and "Expected w to be an initializer" in str(err.value)
    assert not (tmp_path / "out" / "shared.onnx").exists()


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all", "truncated"])
def test_corrupt_model(tmp_path: Path, content: bytes | str) -> None:
    model = tmp_path / "bad.onnx"
    if content == "truncated":
        content = silero_onnx_variants()[0].read_bytes()[:50_000]
    model.write_bytes(content)  # type: ignore[arg-type]
    for run in (
        lambda: dynamic(model, tmp_path),
        lambda: static(model, tmp_path, [tmp_path / "unused.npz"]),
    ):
        with pytest.raises(PassError) as err:
            run()
        assert err.value.reason is Reason.CorruptModel and "bad.onnx" in str(err.value)


def static(model: Path, tmp_path: Path, files: list[Path], **kw: object) -> tuple[Path, dict]:
    spec = {"precision": "int8", "mode": "static", "calibration": {"uri": "file:///c/"}, **kw}
    config = QuantizationConfig.model_validate(spec)
    ctx = PassContext(tmp_path / "w", calibration_files=files)
    result = OnnxInt8StaticPass().run(model, config, tmp_path / "out" / model.name, ctx)
    return result.output, result.details


def test_static_calibration_errors_are_invalid_spec(tmp_path: Path) -> None:
    model = mlp(tmp_path / "m.onnx", [helper.make_node("Relu", ["y"], ["z"])])
    x = RNG.standard_normal((1, 64)).astype(np.float32)
    np.savez(tmp_path / "a_good.npz", x=x)
    np.savez(tmp_path / "b_noinput.npz", other=x)
    np.savez(tmp_path / "c_int.npz", x=x.astype(np.int64))
    np.savez(tmp_path / "d_shape.npz", x=x.reshape(64))
    good, *bad = sorted(tmp_path.glob("*.npz"))
    with pytest.raises(InvalidSpec, match="needs calibration samples"):
        static(model, tmp_path, [])
    messages = {
        "b_noinput.npz": "no array for model input 'x'",
        "c_int.npz": "input 'x' is int64",
        "d_shape.npz": "input 'x' has rank 1 (shape (64,)), the model takes rank 2",
    }
    for path in bad:
        with pytest.raises(InvalidSpec, match=re.escape(messages[path.name])) as err:
            static(model, tmp_path, [path])
        assert path.name in str(err.value)
    # A bad file after good ones fails inside onnxruntime's calibration loop: still InvalidSpec.
    with pytest.raises(InvalidSpec, match=r"b_noinput\.npz"):
        static(model, tmp_path, [good, bad[0]])
    with pytest.raises(InvalidSpec, match="QInt8 with weightType QUInt8"):
        static(model, tmp_path, [good], activationType="QInt8", weightType="QUInt8")
    out, details = static(model, tmp_path, [good, tmp_path / "a_good.npz"])
    assert details["calibration"]["samples"] == 2 and "QuantizeLinear" in ops(out)
