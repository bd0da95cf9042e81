"""INT8 pre-processing on files (passes/int8_optimize.py): the model onnxruntime's
quant_pre_process writes for a model with external data, without its weights in Python."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import save_external
from corpus import build_corpus
from onnx import numpy_helper

from kquant_job.passes import int8_prepare
from kquant_job.passes.int8_optimize import optimize_external
from kquant_job.passes.int8_prepare import import_quant_pre_process, preprocess
from kquant_job.passes.int8_shapes import verified_onnxruntime
from kquant_job.passes.onnx_common import data_file_for, working_directory


def _library(model: Path, out: Path) -> None:
    with working_directory(out.parent):
        import_quant_pre_process()(
            str(model), str(out), skip_symbolic_shape=True, save_as_external_data=True,
            all_tensors_to_one_file=True, external_data_location=data_file_for(out).name,
        )  # fmt: skip


def _assert_same_model(ours: Path, theirs: Path) -> None:
    a, b = onnx.load(str(ours)), onnx.load(str(theirs))  # weights loaded from the data files
    assert a.metadata_props == b.metadata_props and a.opset_import == b.opset_import
    for field in ("node", "input", "output", "value_info"):
        assert list(getattr(a.graph, field)) == list(getattr(b.graph, field)), field
    names = [t.name for t in a.graph.initializer]
    assert names == [t.name for t in b.graph.initializer]
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert x.data_type == y.data_type and list(x.dims) == list(y.dims), x.name
        np.testing.assert_array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))


@pytest.mark.parametrize("name", ["bert_tiny", "silero_vad", "whisper_tiny", "lstm_gru"])
def test_the_same_model_as_quant_pre_process(tmp_path: Path, name: str) -> None:
    model = save_external(build_corpus()[name].path, tmp_path / "m")
    (tmp_path / "lib").mkdir()
    _library(model, tmp_path / "lib" / "pre.onnx")
    (tmp_path / "ours").mkdir()
    optimize_external(model, tmp_path / "ours" / "pre.onnx")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["pre.onnx", "pre.onnx.data"]
    _assert_same_model(tmp_path / "ours" / "pre.onnx", tmp_path / "lib" / "pre.onnx")
    graph = onnx.load(str(tmp_path / "ours" / "pre.onnx"), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert not any(t.raw_data for t in external)
    assert external or name.startswith("silero")  # Silero's weights are in its If branches


def test_a_failed_optimization_leaves_nothing(tmp_path: Path) -> None:
    model = save_external(build_corpus()["bert_tiny"].path, tmp_path / "m")
    data = data_file_for(model)
    data.write_bytes(data.read_bytes()[:100])  # the weights end early
    out = tmp_path / "out" / "pre.onnx"
    out.parent.mkdir()
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error
        optimize_external(model, out)
    assert list(out.parent.iterdir()) == []


def test_preprocess_takes_the_file_path_and_reports_as_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = save_external(build_corpus()["silero_vad"].path, tmp_path / "m")
    calls: list[bool] = []
    real = import_quant_pre_process()

    def counting(*args, **kwargs):
        calls.append(kwargs["skip_symbolic_shape"])
        return real(*args, **kwargs)

    monkeypatch.setattr(int8_prepare, "import_quant_pre_process", lambda: counting)
    (tmp_path / "a").mkdir()
    out, details = preprocess(model, tmp_path / "a", external=True)
    assert calls == []  # neither the doomed symbolic attempt nor the library's loads

    monkeypatch.setattr(int8_prepare, "verified_onnxruntime", lambda: False)
    (tmp_path / "b").mkdir()
    theirs, before = preprocess(model, tmp_path / "b", external=True)
    assert calls == [True]
    assert details == before and details["preprocessSkipped"] == ["symbolicShapeInference"]
    _assert_same_model(out, theirs)


def test_an_optimization_that_fails_falls_back_to_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = save_external(build_corpus()["silero_vad"].path, tmp_path / "m")

    def broken(model_in: Path, out: Path) -> None:
        raise RuntimeError("no session")

    monkeypatch.setattr(int8_prepare, "optimize_external", broken)
    (tmp_path / "a").mkdir()
    out, details = preprocess(model, tmp_path / "a", external=True)
    assert details["preprocess"] == "applied" and out.exists()


def test_an_unverified_onnxruntime_keeps_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime

    model = save_external(build_corpus()["silero_vad"].path, tmp_path / "m")
    calls: list[bool] = []
    real = import_quant_pre_process()

    def counting(*args, **kwargs):
        calls.append(kwargs["skip_symbolic_shape"])
        return real(*args, **kwargs)

    monkeypatch.setattr(int8_prepare, "import_quant_pre_process", lambda: counting)
    assert verified_onnxruntime()
    monkeypatch.setattr(onnxruntime, "__version__", "1.32.0")
    assert not verified_onnxruntime()
    (tmp_path / "a").mkdir()
    preprocess(model, tmp_path / "a", external=True)
    assert calls == [True]  # the library's own pre-processing
