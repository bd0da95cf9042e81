"""Tolerances on decisions, end to end on Silero VAD and real speech: a numeric bound loose
enough to pass INT8's broken speech probability is caught by the speech / non-speech
decision and its segments; the INT8 fallback ladder, probed with the same rule, goes on to a
configuration that keeps the decisions."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import silero_dir
from worker_helpers import VARIANTS, manifest, run_worker, speech_feeds

from kquant_job.audio import write_feeds

SILERO = next(v for v in VARIANTS if v.file == "silero_vad.onnx")
LOOSE = {"maxMeanAbsError": 1.0, "minCosineSimilarity": -1}  # passes any probability
VAD = {"output": {"threshold": 0.5, "minAgreement": 0.99, "maxBoundaryShift": 1}}


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    write_feeds(speech_feeds(SILERO, 96), root)
    return root


def run(tmp_path: Path, speech: Path, quantization: dict, tolerance: dict, samples: int = 96):
    model = tmp_path / "m" / "silero_vad.onnx"
    model.parent.mkdir(parents=True)
    shutil.copyfile(silero_dir() / "silero_vad.onnx", model)
    validation = {"dataUri": f"file://{speech}/", "samples": samples,
                  "feedback": {"stateN": "state"}, "tolerance": tolerance}  # fmt: skip
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", quantization, endpoint=None,
                   validation=validation)  # fmt: skip
    return run_worker(job, tmp_path / "run", dict(os.environ))


def test_a_loose_numeric_bound_passes_what_the_decisions_refuse(tmp_path, speech):
    # every op INT8: Silero's convs break; no gain verdict (its latency varies by CPU)
    strict = {"precision": "int8", "strict": True, "requireGain": False}
    numeric = run(tmp_path / "a", speech, strict, LOOSE)
    assert numeric.code == 0, numeric.log
    decided = run(tmp_path / "b", speech, strict, {**LOOSE, "decisions": VAD})
    assert (decided.code, decided.result["reason"]) == (40, "ValidationFailed"), decided.log
    assert "output 'output': decisions (threshold at 0.5) agree on" in decided.result["message"]
    report = json.loads(Path(decided.result["reportUri"].removeprefix("file://")).read_text())
    output = report["models"][0]["validation"]["outputs"]["output"]
    assert output["decisionAgreement"] < 0.99
    assert "segmentsOriginal" in output and "segmentsConverted" in output


def test_the_fallback_ladder_is_probed_with_the_decisions(tmp_path, speech):
    int8 = {"precision": "int8", "requireGain": False}  # the ladder, not the gain, is tested
    done = run(tmp_path, speech, int8, {**LOOSE, "decisions": VAD})
    assert done.code == 0, done.log
    report = json.loads(Path(tmp_path / "out" / "report.json").read_text())
    details = report["models"][0]["details"]
    first = details["attempts"][0]
    assert not first["probe"]["ok"]  # the requested configuration flips decisions
    assert any("decisions" in v for v in first["probe"]["violations"])
    output = report["models"][0]["validation"]["outputs"]["output"]
    assert output["decisionAgreement"] >= 0.99
    assert output["segmentsOriginal"] == output["segmentsConverted"]
    assert "decisions agree" in done.log


@pytest.mark.parametrize("where", ["decisions", "outputs"])
def test_a_tolerance_naming_no_output_is_an_invalid_spec_before_converting(tmp_path, where):
    """A typo in an output name under tolerance.decisions ran FP16's whole repair ladder
    and ended in ConversionFailed ("fails even with every node FP32"); under
    tolerance.outputs, a full INT8 conversion ended in ValidationFailed."""
    model = tmp_path / "m" / "silero_vad.onnx"
    model.parent.mkdir()
    shutil.copyfile(silero_dir() / "silero_vad.onnx", model)
    rule = {"threshold": 0.5} if where == "decisions" else {"maxAbsError": 0.1}
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", {"precision": "fp16"},
                   endpoint=None, validation={"tolerance": {where: {"speech": rule}}})  # fmt: skip
    result = run_worker(job, tmp_path / "run", dict(os.environ))
    assert (result.code, result.result["reason"]) == (10, "InvalidSpec"), result.log
    message = result.result["message"]
    assert f"spec.validation.tolerance.{where}.speech" in message and "output" in message
    assert "convert silero_vad.onnx" not in result.log  # refused before any conversion


def test_a_rule_that_compared_no_segment_says_so(tmp_path, speech):
    """New-user trial: on the default 16 samples (the clip's first frames, no speech) the
    rule read "segments 0 -> 0" and passed without comparing anything."""
    fp16 = {"precision": "fp16"}
    rule = {**LOOSE, "decisions": VAD}
    few = run(tmp_path / "few", speech, fp16, rule, samples=16)
    assert few.code == 0, few.log
    [note] = [n for n in few.result.get("notes", []) if "compared no segment" in n]
    assert note.startswith("silero_vad.onnx: output output: no decision above the threshold")
    enough = run(tmp_path / "all", speech, fp16, rule)
    assert enough.code == 0 and not [n for n in enough.result.get("notes", [])
                                     if "compared no segment" in n]  # fmt: skip


def test_a_rule_on_speech_everywhere_says_it_compared_no_boundary(tmp_path):
    """Trial: samples that are speech throughout (frames 45-92 of the clip: Silero says
    speech on each, from a zero state) read "segments 1 -> 1, boundaries within 0" and
    passed with no note, though no start or end of speech was compared."""
    speech_only = tmp_path / "speech"
    write_feeds(speech_feeds(SILERO, 93)[45:], speech_only)
    done = run(tmp_path, speech_only, {"precision": "fp16"}, {**LOOSE, "decisions": VAD}, 48)
    assert done.code == 0, done.log
    assert "decisions agree 1.0000 (segments 1 -> 1, boundaries within 0)" in done.log
    [note] = [n for n in done.result.get("notes", []) if "decisions above" in n]
    assert note == (
        "silero_vad.onnx: output output: all 48 decisions above the threshold in both "
        "models over its 48 samples: one segment spanning the stream, no start or end to "
        "compare, so the decisions rule measured only that both stay positive; validate on "
        "samples that also hold some below it (validation.samples, default 16; "
        "validation.dataUri)"
    )
    report = json.loads(Path(tmp_path / "out" / "report.json").read_text())
    output = report["models"][0]["validation"]["outputs"]["output"]
    assert (output["decisions"], output["positiveOriginal"]) == (48, 48)
