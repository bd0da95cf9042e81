"""onnx_external: FP16 conversion of models with external data, one tensor at a time, gives
the same model as converting it with its weights in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from fp16_helpers import FP16, convert, run
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.transformers.float16 import convert_np_to_float16

from kquant_api import QuantizationConfig
from kquant_job.passes.onnx_common import iter_tensors, load_model
from kquant_job.passes.onnx_external import ALIGNMENT, save_streaming
from kquant_job.passes.onnx_fp16_convert import convert as convert_graph

RNG = np.random.default_rng(5)
W1 = RNG.standard_normal((64, 48)).astype(np.float32)
W2 = RNG.standard_normal((48, 32)).astype(np.float32) * np.float32(1e3)  # read by an FP32 node
BIAS = RNG.standard_normal(48).astype(np.float32)
BLOCKED = QuantizationConfig(precision="fp16", nodeBlockList=["mm2"])


def _model(path: Path, *, external: bool, drop_length: bool = False) -> Path:
    """x (2, 64) -> MatMul W1 -> Add bias -> Relu -> MatMul W2 (node mm2) -> Mul by a
    Constant; every tensor stored outside the model when ``external``."""
    scale = numpy_helper.from_array(np.full((32,), 0.5, np.float32), "scale_value")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
            helper.make_node("Add", ["h1", "bias"], ["h2"], name="add"),
            helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
            helper.make_node("MatMul", ["h3", "w2"], ["h4"], name="mm2"),
            helper.make_node("Constant", [], ["scale"], name="const", value=scale),
            helper.make_node("Mul", ["h4", "scale"], ["y"], name="mul"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        [
            numpy_helper.from_array(W1, "w1"),
            numpy_helper.from_array(BIAS, "bias"),
            numpy_helper.from_array(W2, "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not external:
        onnx.save(model, str(path))
        return path
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
        convert_attribute=True,
    )
    if drop_length:  # onnx allows it: the bytes then run to the end of the file
        proto = onnx.load(str(path), load_external_data=False)
        offset = {t.name: {e.key: int(e.value) for e in t.external_data if e.key == "offset"}
                  for t in iter_tensors(proto)}  # fmt: skip
        last = max(iter_tensors(proto), key=lambda t: offset[t.name].get("offset", 0))
        kept = [e for e in last.external_data if e.key != "length"]
        del last.external_data[:]
        last.external_data.extend(kept)
        onnx.save(proto, str(path))
    return path


def _tensors(path: Path) -> dict[str, tuple[int, list[int], bytes]]:
    model = load_model(path)
    return {
        t.name: (t.data_type, list(t.dims), numpy_helper.to_array(t).tobytes())
        for t in iter_tensors(model)
    }


@pytest.mark.parametrize("drop_length", [False, True])
def test_external_source_converts_to_the_same_model_as_an_embedded_one(
    tmp_path: Path, drop_length: bool
) -> None:
    embedded = _model(tmp_path / "embedded" / "m.onnx", external=False)
    external = _model(tmp_path / "external" / "m.onnx", external=True, drop_length=drop_length)
    assert onnx.load(str(external), load_external_data=False).graph.initializer[0].data_location
    a = convert(embedded, tmp_path / "a", BLOCKED)
    b = convert(external, tmp_path / "b", BLOCKED)
    assert _tensors(a.output) == _tensors(b.output)
    types = {name: t[0] for name, t in _tensors(b.output).items()}
    assert types == {
        "w1": TensorProto.FLOAT16,
        "bias": TensorProto.FLOAT16,
        "w2": TensorProto.FLOAT,  # only mm2 reads it, and mm2 stays FP32
        "scale_value": TensorProto.FLOAT16,
    }
    feeds = {"x": RNG.standard_normal((2, 64)).astype(np.float32)}
    np.testing.assert_array_equal(run(a.output, feeds)[0], run(b.output, feeds)[0])


def test_streaming_save_writes_an_aligned_data_file_cast_tensor_by_tensor(tmp_path: Path) -> None:
    source = _model(tmp_path / "src" / "m.onnx", external=True)
    base = onnx.shape_inference.infer_shapes(load_model(source, load_external_data=False))
    converted = convert_graph(base, keep_io_types=True, ops=set(), nodes={"mm2"})
    # the converter saw placeholders: no tag left, shapes and references back, and the
    # graph is the one converting the weights in memory gives
    for tensor in iter_tensors(converted):
        assert not tensor.doc_string and tensor.data_location == TensorProto.EXTERNAL
    in_memory = onnx.shape_inference.infer_shapes(load_model(source))
    in_memory = convert_graph(in_memory, keep_io_types=True, ops=set(), nodes={"mm2"})
    assert converted.graph.value_info == in_memory.graph.value_info

    def wiring(model: onnx.ModelProto) -> list[tuple]:
        return [(n.name, n.op_type, list(n.input), list(n.output)) for n in model.graph.node]

    assert wiring(converted) == wiring(in_memory)
    dims = {t.name: list(t.dims) for t in iter_tensors(converted)}
    assert dims == {t.name: list(t.dims) for t in iter_tensors(in_memory)}

    files = save_streaming(converted, tmp_path / "out" / "m.onnx", source.parent, inline_limit=0)
    assert [f.name for f in files] == ["m.onnx", "m.onnx.data"]
    model = onnx.load(str(files[0]), load_external_data=False)
    offsets = {t.name: {e.key: e.value for e in t.external_data} for t in iter_tensors(model)}
    assert all(int(info["offset"]) % ALIGNMENT == 0 for info in offsets.values())
    assert {info["location"] for info in offsets.values()} == {"m.onnx.data"}
    got = _tensors(files[0])
    assert got["w1"][2] == convert_np_to_float16(W1).tobytes()
    assert got["bias"][2] == convert_np_to_float16(BIAS).tobytes()
    assert got["w2"] == (TensorProto.FLOAT, [48, 32], W2.tobytes())  # copied as it was

    inline = save_streaming(
        convert_graph(base, keep_io_types=True, ops=set(), nodes={"mm2"}),
        tmp_path / "inline" / "m.onnx",
        source.parent,
    )
    assert [f.name for f in inline] == ["m.onnx"]  # under 2 GiB: one file, as before
    assert _tensors(inline[0]) == got
    feeds = {"x": RNG.standard_normal((2, 64)).astype(np.float32)}
    expected = run(source, feeds)[0]
    out = run(files[0], feeds)[0]
    np.testing.assert_array_equal(out, run(inline[0], feeds)[0])
    assert np.abs(out - expected).max() / np.abs(expected).max() < 1e-2


def test_unreadable_source_data_raises_and_leaves_no_model(tmp_path: Path) -> None:
    source = _model(tmp_path / "src" / "m.onnx", external=True)
    base = load_model(source, load_external_data=False)
    converted = convert_graph(base, keep_io_types=True, ops=set(), nodes=set())
    (source.parent / "weights.bin").unlink()
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(OSError):
        save_streaming(converted, out, source.parent, inline_limit=0)
    assert not out.exists() and not out.with_name("m.onnx.data").exists()


def test_fp16_pass_keeps_the_source_untouched(tmp_path: Path) -> None:
    source = _model(tmp_path / "src" / "m.onnx", external=True)
    before = {f.name: f.read_bytes() for f in source.parent.iterdir()}
    convert(source, tmp_path / "run", FP16)
    assert {f.name: f.read_bytes() for f in source.parent.iterdir()} == before
