"""INT8 pre-processing: symbolic shape inference is tried on the graph alone first, so a
model it fails on is not loaded with its weights for a doomed attempt."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from conftest import save_external

from kquant_job.passes import int8_prepare
from kquant_job.passes.int8_prepare import preprocess


def test_a_graph_symbolic_inference_fails_on_is_preprocessed_as_before(
    silero_onnx, tmp_path, monkeypatch
):
    model = save_external(silero_onnx, tmp_path / "m")
    failure = int8_prepare._symbolic_failure(model, tmp_path / "scratch")
    assert failure  # Silero VAD's If branches have untyped outputs
    # onnxruntime saved its partial model into the current directory: a scratch one, gone
    assert not list(tmp_path.rglob("sym_shape_infer_temp*")) and Path.cwd() != tmp_path
    assert not list(Path.cwd().glob("sym_shape_infer_temp*"))

    calls: list[bool] = []
    real = int8_prepare.import_quant_pre_process()

    def counting(*args, **kwargs):
        calls.append(kwargs["skip_symbolic_shape"])
        return real(*args, **kwargs)

    monkeypatch.setattr(int8_prepare, "import_quant_pre_process", lambda: counting)
    # the library's path (test_int8_optimize covers the one on files that replaces it here)
    monkeypatch.setattr(int8_prepare, "verified_onnxruntime", lambda: False)
    (tmp_path / "a").mkdir()
    out, details = preprocess(model, tmp_path / "a", external=True)
    assert calls == [True]  # the doomed full attempt is not made
    assert out.exists() and details["preprocessSkipped"][0] == "symbolicShapeInference"

    calls.clear()
    monkeypatch.setattr(int8_prepare, "_symbolic_failure", lambda *_: None)
    (tmp_path / "b").mkdir()
    _, before = preprocess(model, tmp_path / "b", external=True)
    assert calls == [False, True]  # the old order: full attempt, then without symbolic
    assert details == before  # the same report either way
    assert not list(tmp_path.rglob("sym_shape_infer_temp*"))  # the library's attempt too


@pytest.mark.parametrize("opset", [10])
def test_old_opsets_are_left_to_quant_pre_process(tmp_path, opset):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    assert int8_prepare._symbolic_failure(path, tmp_path) is None
