"""An FP16 conversion of an ONNX file with large embedded weights first moves them to a data
file in the scratch folder: the reference session, the activation ranges and the FP16 pass
then read them tensor by tensor. The result is the same single file, validated the same."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from corpus import build_corpus
from test_zero_config import minimal_job

import kquant_job.passes.onnx_fp16 as onnx_fp16
from kquant_api import QuantizationJob
from kquant_job.stage import StageInput, convert_and_validate


def _bert_tiny(tmp_path: Path) -> Path:
    model = tmp_path / "m" / "bert_tiny.onnx"
    model.parent.mkdir()
    shutil.copyfile(build_corpus()["bert_tiny"].path, model)
    return model


def _run(model: Path, work: Path, quantization: dict | None = None):
    job = minimal_job(model)
    if quantization:
        doc = job.model_dump(mode="json", exclude_none=True)
        doc["spec"]["quantization"] = quantization
        job = QuantizationJob.model_validate(doc)
    io = StageInput(model, [], work / "data", [], work / "calib", work / "staged", work / "s")
    return convert_and_validate(job, io)


def test_spilled_weights_give_the_same_validated_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _bert_tiny(tmp_path)
    plain = _run(model, tmp_path / "plain").models[0]
    assert not (tmp_path / "plain" / "s" / "0-spilled").exists()  # small: below the bound
    monkeypatch.setattr(onnx_fp16, "SPILL_BYTES", 1024)
    spilled = _run(model, tmp_path / "spilled").models[0]
    copy = tmp_path / "spilled" / "s" / "0-spilled"
    assert sorted(p.name for p in copy.iterdir()) == ["bert_tiny.onnx", "bert_tiny.onnx.data"]
    assert spilled.out_files == plain.out_files == ["bert_tiny_fp16.onnx"]  # no data file
    assert spilled.validation["passed"] and plain.validation["passed"]
    # the same values measured, the same conversion: the same errors
    for key in ("maxAbsError", "meanAbsError", "cosineSimilarity"):
        assert spilled.validation["summary"][key] == pytest.approx(
            plain.validation["summary"][key], rel=1e-6
        )
    assert spilled.details["activationRanges"] == "measured"
    assert spilled.original_bytes == plain.original_bytes == model.stat().st_size


def test_int8_of_spilled_weights_is_one_file_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _bert_tiny(tmp_path)
    monkeypatch.setattr(onnx_fp16, "SPILL_BYTES", 1024)
    work = tmp_path / "w"
    out = _run(model, work, {"precision": "int8", "requireGain": False}).models[0]
    assert (work / "s" / "0-spilled" / "bert_tiny.onnx.data").is_file()  # the pass read this
    assert out.out_files == ["bert_tiny_int8.onnx"]  # and wrote one file again
    assert out.validation["passed"], out.validation["violations"]
    assert out.details["quantizedOps"]
