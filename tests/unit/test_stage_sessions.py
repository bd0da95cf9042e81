"""The stage loads an INT8 model once: validation takes the session of the probe that passed
it (validate/compare.py Reference.take_session), for a single model only: a stage
converting several models keeps no session beside the next conversion, and FP16, whose
session held from its probe raised the job's peak memory, keeps none."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import silero_dir
from test_zero_config import minimal_job

import kquant_job.validate.compare as compare
from kquant_job.stage import StageInput, convert_and_validate


def _taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each validation got the probe's session."""
    got: list[bool] = []
    real = compare.Reference.take_session

    def recorded(self: compare.Reference, converted: Path) -> object:
        session = real(self, converted)
        got.append(session is not None)
        return session

    monkeypatch.setattr(compare.Reference, "take_session", recorded)
    return got


@pytest.mark.parametrize(("models", "precision"), [(1, "int8"), (2, "int8"), (1, "fp16")])
def test_validation_reuses_the_probe_session_of_a_single_model_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models: int, precision: str
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for i in range(models):
        shutil.copyfile(silero_dir() / "silero_vad.onnx", folder / f"vad{i}.onnx")
    source = folder / "vad0.onnx" if models == 1 else folder
    job = minimal_job(source)
    doc = job.model_dump(mode="json", exclude_none=True)
    doc["spec"]["quantization"] = {"precision": precision, "requireGain": False}
    if models > 1:
        doc["spec"]["model"]["uri"] = f"file://{folder}/"
    job = type(job).model_validate(doc)
    got = _taken(monkeypatch)
    work = tmp_path / "w"
    io = StageInput(source, [], work / "data", [], work / "calib", work / "staged", work / "s")
    outcome = convert_and_validate(job, io)
    assert len(outcome.models) == models
    assert all(m.validation and m.validation["passed"] for m in outcome.models)
    assert got == [models == 1 and precision == "int8"] * models
