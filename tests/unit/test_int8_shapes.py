"""onnxruntime's dynamic quantizer with kquant's shape inference (passes/int8_shapes.py)
writes the same bytes as with its own save-and-reload, without loading the weights again."""

from __future__ import annotations

import importlib
from pathlib import Path

import onnx
import onnxruntime.quantization.onnx_quantizer as onnx_quantizer
import pytest
from corpus import build_corpus
from onnxruntime.quantization import quantize_dynamic

from kquant_job.passes.int8_prepare import prepare, save_localized
from kquant_job.passes.int8_shapes import (
    light_shape_reload,
    load_with_inferred_shapes,
    value_infos_only,
    with_inferred_shapes,
)

quantize_module = importlib.import_module("onnxruntime.quantization.quantize")


@pytest.mark.parametrize(
    "name", ["bert_tiny", "whisper_tiny", "lstm_gru", "silero_vad", "silero_vad_op18_ifless"]
)
def test_the_quantized_model_is_the_same_bytes(tmp_path: Path, name: str) -> None:
    src = build_corpus()[name].path
    extra = {}
    if name.startswith("silero"):  # weights in If branches: prepared as kquant INT8 does
        prepared = prepare(src, tmp_path / "prep")
        save_localized(prepared, tmp_path / "prep")  # the op18 export has some to move
        src, extra = prepared.path, {"EnableSubgraph": True}
    quantize_dynamic(src, tmp_path / "theirs.onnx", extra_options=dict(extra))
    with light_shape_reload():
        quantize_dynamic(src, tmp_path / "ours.onnx", extra_options=dict(extra))
    theirs = (tmp_path / "theirs.onnx").read_bytes()
    assert (tmp_path / "ours.onnx").read_bytes() == theirs
    assert onnx_quantizer.save_and_reload_model_with_shape_infer is not with_inferred_shapes


def test_the_shapes_come_without_the_weights(tmp_path: Path) -> None:
    model = onnx.load(str(build_corpus()["bert_tiny"].path))
    light = value_infos_only(model)
    assert len(light.graph.value_info) > 0
    big = [t for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and not any(t.raw_data for t in big)  # no weight bytes copied
    assert light.ByteSize() < model.ByteSize() / 4
    assert len(model.graph.value_info) == 0  # the quantizer's own model is left as it was


def test_an_unverified_onnxruntime_keeps_its_own_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    original = onnx_quantizer.save_and_reload_model_with_shape_infer
    monkeypatch.setattr(onnxruntime, "__version__", "9.0.0")
    with light_shape_reload():
        assert onnx_quantizer.save_and_reload_model_with_shape_infer is original
    monkeypatch.setattr(onnxruntime, "__version__", "1.31.1")
    with light_shape_reload():
        assert onnx_quantizer.save_and_reload_model_with_shape_infer is with_inferred_shapes
        assert quantize_module.load_model_with_shape_infer is load_with_inferred_shapes
    assert onnx_quantizer.save_and_reload_model_with_shape_infer is original
    assert quantize_module.load_model_with_shape_infer is not load_with_inferred_shapes


def test_a_model_with_external_data_quantizes_to_the_same_bytes_writing_nothing_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """quantize_dynamic's own load writes ``<name>-inferred.onnx`` beside its input: for a
    source read in place, the user's folder (the sandbox forbids it; dynamic INT8 skips
    pre-processing, which had given it a copy in scratch, where nothing changes)."""
    source = tmp_path / "src"
    source.mkdir()
    model = onnx.load(str(build_corpus()["bert_tiny"].path))
    onnx.save(model, str(source / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)  # fmt: skip
    before = sorted(p.name for p in source.iterdir())
    theirs, ours = tmp_path / "theirs" / "model.onnx", tmp_path / "ours" / "model.onnx"
    theirs.parent.mkdir()
    ours.parent.mkdir()
    quantize_dynamic(source / "model.onnx", theirs, use_external_data_format=True)
    written: list[str] = []
    real = onnx.shape_inference.infer_shapes_path

    def recorded(src: str, dst: str = "", *args: object, **kw: object) -> None:
        written.append(dst)
        real(src, dst, *args, **kw)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", recorded)
    with light_shape_reload():
        quantize_dynamic(source / "model.onnx", ours, use_external_data_format=True)
    assert not [w for w in written if Path(w).parent == source]  # the library's -inferred
    assert sorted(p.name for p in source.iterdir()) == before
    for rel in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "ours" / rel).read_bytes() == (tmp_path / "theirs" / rel).read_bytes()


@pytest.mark.parametrize(
    ("dtype", "count", "large"),
    [(onnx.TensorProto.FLOAT, 247, False), (onnx.TensorProto.FLOAT, 248, True),
     (onnx.TensorProto.INT4, 1980, False), (onnx.TensorProto.INT4, 1982, True)],
)  # fmt: skip
def test_large_means_what_onnx_moves_to_its_data_file(dtype: int, count: int, large: bool) -> None:
    """The size rule matches onnx.save_model's (sys.getsizeof(raw_data) >= 1024), 4-bit
    types packed two values a byte."""
    import sys

    import numpy as np

    from kquant_job.passes.int8_shapes import _large

    raw = np.zeros((count + 1) // 2 if dtype == onnx.TensorProto.INT4 else count * 4, np.uint8)
    tensor = onnx.helper.make_tensor("t", dtype, [count], raw.tobytes(), raw=True)
    assert _large(tensor) is large
    assert (sys.getsizeof(tensor.raw_data) >= 1024) is large
