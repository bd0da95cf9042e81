"""The byte scan that spares a full parse of an ONNX file without external data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kquant_job.formats import may_hold_external_data, plan_model

BLOCK = 8 * 1024 * 1024  # the scan's block size


def _model(path: Path, external: bool) -> Path:
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=external,
              location="model.onnx.data", size_threshold=0)  # fmt: skip
    return path


def test_embedded_and_external_models_are_told_apart(tmp_path):
    embedded = _model(tmp_path / "a" / "model.onnx", external=False)
    external = _model(tmp_path / "b" / "model.onnx", external=True)
    assert not may_hold_external_data(embedded)
    assert may_hold_external_data(external)
    assert plan_model(embedded).models[0].external == []
    assert plan_model(external).models[0].external == ["model.onnx.data"]


@pytest.mark.parametrize("offset", [BLOCK - 8, BLOCK - 4, BLOCK - 1, BLOCK, 2 * BLOCK + 3])
def test_the_key_is_found_across_block_boundaries(tmp_path, offset):
    data = bytearray(3 * BLOCK)
    data[offset : offset + 8] = b"location"
    path = tmp_path / "blob.onnx"
    path.write_bytes(bytes(data))
    assert may_hold_external_data(path)
    data[offset : offset + 8] = b"locatioN"
    path.write_bytes(bytes(data))
    assert not may_hold_external_data(path)
