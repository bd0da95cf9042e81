"""Format detection from content, and the plan for model directories."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kquant_api import ModelFormat, Reason
from kquant_job.errors import PassError
from kquant_job.formats import detect_format, plan_model


def tiny_onnx(path, *, external: bool = False):
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    model = helper.make_model(graph)
    onnx.save(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )
    return path


def test_real_models_are_detected_by_content(silero_onnx, tmp_path):
    data = silero_onnx.parent
    assert detect_format(silero_onnx) is ModelFormat.onnx
    assert detect_format(data / "silero_vad.jit") is ModelFormat.torchscript
    assert detect_format(data / "silero_vad_16k.safetensors") is ModelFormat.safetensors
    renamed = tmp_path / "model.bin"
    shutil.copy(silero_onnx, renamed)
    assert detect_format(renamed) is ModelFormat.onnx


def test_non_models_are_not_detected(tmp_path):
    text = tmp_path / "config.json"
    text.write_text('{"sample_rate": 16000}')
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme.txt", "hello")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path in (text, archive, empty):
        assert detect_format(path) is None


def test_corrupt_onnx_and_non_model_are_classified(silero_onnx, tmp_path):
    corrupt = tmp_path / "silero_vad.onnx"
    corrupt.write_bytes(silero_onnx.read_bytes()[:5000])
    with pytest.raises(PassError) as err:
        plan_model(corrupt)
    assert err.value.reason is Reason.CorruptModel
    assert "5000 bytes whose content does not parse" in str(err.value)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(PassError) as err:
        plan_model(empty)
    assert err.value.reason is Reason.CorruptModel and "an empty file" in str(err.value)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(PassError) as err:
        plan_model(notes)
    assert err.value.reason is Reason.UnsupportedFormat
    with pytest.raises(PassError) as err:
        plan_model(silero_onnx, ModelFormat.safetensors)
    assert err.value.reason is Reason.CorruptModel


def test_directory_plan_converts_models_copies_the_rest_and_skips_external_data(tmp_path):
    root = tmp_path / "SenseVoiceSmall"
    (root / "sub").mkdir(parents=True)
    tiny_onnx(root / "model.onnx", external=True)
    tiny_onnx(root / "sub" / "head.onnx")
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        (root / name).write_text(name)
    plan = plan_model(root)
    assert [m.rel for m in plan.models] == ["model.onnx", "sub/head.onnx"]
    assert plan.external_data == ["model.onnx.data"]
    assert plan.models[0].external == ["model.onnx.data"] and plan.models[1].external == []
    assert plan.copies == ["config.json", "tokenizer.json", "vocab.txt"]
    plan = plan_model(root, exclude=["head.onnx"])
    assert [m.rel for m in plan.models] == ["model.onnx"]
    assert "sub/head.onnx" in plan.copies
    with pytest.raises(PassError) as err:
        plan_model(root, include=["*.pt"])
    assert err.value.reason is Reason.UnsupportedFormat


def test_kquant_outputs_are_the_folders_holding_a_kquant_folder() -> None:
    from kquant_job.formats import kquant_outputs

    rels = [
        "silero.onnx",
        "out/manifest.json",
        "out/silero_fp16.onnx",
        "out/.kquant/sets/1/silero_fp16.onnx",
        "out/.kquant/sets/1/inner/.kquant/sets/2/x.onnx",  # inside the first output
        "a/b/.kquant/sets/3/set.json",
        ".kquant/sets/4/set.json",  # the top: refused elsewhere, not skipped
        "c/.kquant",  # a file named .kquant is no folder
        "notes/my.kquant/x.onnx",
    ]
    assert kquant_outputs(rels) == ["a/b/", "out/"]
