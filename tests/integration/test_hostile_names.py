"""Names a model folder should never hold, refused with a precise reason and a result file
(hostile-input trial: each ended in an InternalError traceback, which a Job retries)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from conftest import silero_dir
from onnx import TensorProto, helper, numpy_helper
from worker_helpers import manifest, run_worker


def _job(model: Path, out: Path, precision: str = "fp16") -> dict:
    doc = manifest(f"file://{model}/", f"file://{out}/", {"precision": precision}, endpoint=None)
    doc["spec"].pop("validation")
    return doc


def test_a_file_name_that_is_not_utf8_is_an_unsafe_path(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(silero_dir() / "silero_vad.onnx", folder / "silero_vad.onnx")
    with open(os.fsencode(folder) + b"/bad\xff\xfe.txt", "wb") as fh:  # not UTF-8
        fh.write(b"x")
    run = run_worker(_job(folder, tmp_path / "out"), tmp_path / "run")
    assert (run.code, run.result["reason"]) == (20, "UnsafePath"), run.log
    assert "not valid UTF-8" in run.result["message"]
    assert "Traceback" not in run.log


def _external(folder: Path, location: str) -> np.ndarray:
    """``folder/m.onnx``: a MatMul whose 64x64 weights live in the file ``location``."""
    folder.mkdir()
    weights = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    tensor = numpy_helper.from_array(weights, "W")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [tensor],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    return weights


def test_an_external_data_location_with_a_nul_byte_is_a_corrupt_model(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    weights = _external(folder, "w\x00.bin")
    (folder / "w.bin").write_bytes(weights.tobytes())
    run = run_worker(_job(folder, tmp_path / "out"), tmp_path / "run")
    assert (run.code, run.result["reason"]) == (30, "CorruptModel"), run.log
    assert "holds a NUL byte" in run.result["message"]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.onnx"))


def test_a_fifo_for_the_external_data_of_a_single_model_is_an_unsafe_path(tmp_path: Path) -> None:
    """Trial: reported SourceNotFound ("not at ..."), though something is there."""
    folder = tmp_path / "model"
    _external(folder, "w.bin")
    os.mkfifo(folder / "w.bin")
    doc = manifest(f"file://{folder}/m.onnx", f"file://{tmp_path}/out/", {"precision": "fp16"},
                   endpoint=None)  # fmt: skip
    doc["spec"].pop("validation")
    run = run_worker(doc, tmp_path / "run")
    assert (run.code, run.result["reason"]) == (20, "UnsafePath"), run.log
    assert "is not a regular file" in run.result["message"]


def test_model_inputs_named_like_log_fields_are_logged_as_data(tmp_path: Path) -> None:
    """Trial: an input named ``message`` was an InternalError (``info() got multiple values
    for argument 'message'``); ``level`` and ``stage`` rewrote the log record's own fields."""
    folder = tmp_path / "model"
    folder.mkdir()
    weights = numpy_helper.from_array(np.eye(16, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["message", "W"], ["m"]),
         helper.make_node("Add", ["m", "stage"], ["y"])], "g",
        [helper.make_tensor_value_info("message", TensorProto.FLOAT, [1, 16]),
         helper.make_tensor_value_info("stage", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [weights],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime 1.31 loads
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    doc = manifest(f"file://{folder}/m.onnx", f"file://{tmp_path}/out/", {"precision": "fp16"},
                   endpoint=None)  # fmt: skip
    run = run_worker(doc, tmp_path / "run")
    assert run.result["reason"] != "InternalError", run.log
    assert run.code in (0, 40), run.log  # Validated, or NoGain for a model this small
