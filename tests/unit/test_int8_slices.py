"""onnxruntime's weight quantization through kquant's slices (passes/int8_slices.py): the
same elements, the same quantized models, and the library's own call wherever slicing does
not apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    quant_utils,
    quantize_dynamic,
    quantize_static,
)

from kquant_job.passes import int8_slices
from kquant_job.passes.int8_slices import SLICE_ELEMENTS, sliced, sliced_weight_quantization

INT_TYPES = [TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.INT4]


@pytest.mark.parametrize("qtype", INT_TYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_element_is_quantized_as_the_library_does(qtype: int, symmetric: bool) -> None:
    rng = np.random.default_rng(qtype)
    # not a multiple of the slice, outliers at both ends, and values on .5 boundaries
    data = rng.standard_normal(2 * SLICE_ELEMENTS + 12345).astype(np.float32)
    data[:3] = [-40.0, 35.5, 0.5]
    zero_point, scale = quant_utils.compute_data_quant_params(data, qtype, symmetric)
    whole = quant_utils.quantize_nparray
    expected = whole(qtype, data, scale, zero_point)
    got = sliced(whole)(qtype, data, scale, zero_point)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.tobytes() == expected.tobytes()
    bounded = sliced(whole)(qtype, data, scale, zero_point, -3, 5)
    assert bounded.tobytes() == whole(qtype, data, scale, zero_point, -3, 5).tobytes()


def test_other_calls_go_to_the_library_unchanged() -> None:
    calls: list[tuple[Any, ...]] = []

    def whole(*args: Any) -> Any:
        calls.append(args)
        return quant_utils.quantize_nparray(*args)

    big = np.linspace(-1, 1, SLICE_ELEMENTS + 1, dtype=np.float32)
    scale, zp = np.array(0.01, np.float32), np.array(0, np.int8)
    cases = [
        (TensorProto.INT8, big.reshape(1, -1), scale, zp),  # two dimensions
        (TensorProto.INT8, big[:1000], scale, zp),  # small
        (TensorProto.INT8, big, np.full(big.shape, 0.01, np.float32), zp),  # per element
        (TensorProto.FLOAT8E4M3FN, big[:10], np.array(0.01, np.float32), np.array(0)),
    ]
    for args in cases:
        calls.clear()
        sliced(whole)(*args, None, None)
        assert len(calls) == 1 and calls[0][1] is args[1]
    calls.clear()
    sliced(whole)(TensorProto.INT8, big, scale, zp)
    assert len(calls) == 2  # the sliceable one: one call per slice


def _model(path: Path) -> Path:
    """Gather over an embedding table, MatMul, Conv with several output channels."""
    rng = np.random.default_rng(0)
    weights = {
        "table": rng.standard_normal((300, 64)).astype(np.float32),
        "w": rng.standard_normal((64, 96)).astype(np.float32),
        "k": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("MatMul", ["emb", "w"], ["y"]),
        helper.make_node("Conv", ["img", "k"], ["z"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 1, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 96]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 16, 16])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


class _Reader(CalibrationDataReader):
    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self._feeds = iter(
            [{"ids": rng.integers(0, 300, (2, 5)), "img": rng.standard_normal((1, 1, 16, 16),
              dtype=np.float32)} for _ in range(3)]
        )  # fmt: skip

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


@pytest.mark.parametrize("how", ["dynamic", "dynamic-per-channel", "static-qdq", "static-qop"])
def test_quantized_models_are_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    src = _model(tmp_path / "model.onnx")
    monkeypatch.setattr(int8_slices, "SLICE_ELEMENTS", 1000)  # every weight here is sliced
    lengths: list[int] = []

    def counting(whole: Any) -> Any:
        def counted(qtype: int, arr: Any, *rest: Any) -> Any:
            lengths.append(np.size(arr))
            return whole(qtype, arr, *rest)

        return sliced(counted)

    monkeypatch.setattr(int8_slices, "sliced", counting)

    def run(out: Path) -> bytes:
        if how.startswith("dynamic"):
            quantize_dynamic(src, out, per_channel=how.endswith("channel"))
        else:
            fmt = QuantFormat.QDQ if how == "static-qdq" else QuantFormat.QOperator
            quantize_static(src, out, _Reader(), quant_format=fmt, per_channel=True)
        return out.read_bytes()

    theirs = run(tmp_path / "theirs.onnx")
    original = quant_utils.quantize_nparray
    with sliced_weight_quantization():
        assert quant_utils.quantize_nparray is not original
        ours = run(tmp_path / "ours.onnx")
    assert ours == theirs
    assert quant_utils.quantize_nparray is original
    assert 1000 in lengths  # a weight was quantized in slices


def test_an_unverified_onnxruntime_keeps_its_own_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    original = quant_utils.quantize_nparray
    monkeypatch.setattr(onnxruntime, "__version__", "9.0.0")
    with sliced_weight_quantization():
        assert quant_utils.quantize_nparray is original
