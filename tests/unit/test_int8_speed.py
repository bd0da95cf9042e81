"""INT8 leaves Conv float when its result with INT8 Conv layers is slower than the original.

onnxruntime has no optimized ConvInteger kernel: OCR and detection models quantized with every
Conv as ConvInteger ran 2-8x slower than FP32 (bench_variants.py --wheels) and were NoGain,
where the same models with Conv left float were smaller and faster; static QLinearConv ran
1.3-4.7x slower on the same machine. The ladder's probe times a candidate with INT8 Conv
layers and, when it is slower, goes on at the step that keeps the dense ops only. The probes
here script the latency verdict (a timed test would be flaky); the timed probe itself is
checked on a real model at the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
from corpus import build_corpus
from corpus.runs import reference

from kquant_api import QuantizationConfig
from kquant_job.gain import slower
from kquant_job.passes import PassContext
from kquant_job.passes.base import ProbeResult
from kquant_job.passes.int8_attempts import count_quantized
from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass
from kquant_job.passes.onnx_int8_static import OnnxInt8StaticPass


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def _int8_conv(path: Path) -> int:
    return count_quantized(onnx.load(str(path), load_external_data=False))["quantizedConv"]


class ScriptedProbe:
    """Every candidate within tolerance unless ``dense_fails`` (then only those with INT8
    Conv layers are); a timed candidate with INT8 Conv is 3x slower. Records each call."""

    def __init__(self, dense_fails: bool = False) -> None:
        self.dense_fails = dense_fails
        self.calls: list[tuple[bool, bool]] = []  # (timed, holds ConvInteger)

    def __call__(self, candidate: Path, *, timed: bool = False, keep: bool = False) -> ProbeResult:
        conv_integer = _int8_conv(candidate) > 0
        self.calls.append((timed, conv_integer))
        ok = conv_integer or not self.dense_fails
        result = ProbeResult(ok=ok, violations=[] if ok else ["out: maxAbsError 1 > 0.1"])
        if timed and ok:
            result.latency = {"original": 10.0, "quantized": 30.0, "runs": 20}
            result.slower = conv_integer
        return result


def _note(details: dict) -> list[str]:
    from kquant_job.stage import ModelOutcome
    from kquant_job.table import model_notes

    return model_notes(ModelOutcome("m.onnx", "onnx", [], "m_int8.onnx", [], 100, 60, "p", details))


def _run(tmp_path: Path, probe: ScriptedProbe, **config: object) -> dict:
    model = tmp_path / "speech_encoder.onnx"  # Conv front end, MatMul encoder
    shutil.copyfile(build_corpus()["speech_encoder"].path, model)
    assert {"Conv", "MatMul"} <= _ops(model)
    ctx = PassContext(work_dir=tmp_path / "work", probe=probe)
    ctx.work_dir.mkdir()
    out = tmp_path / "out" / "m.onnx"
    cfg = QuantizationConfig.model_validate({"precision": "int8", **config})
    details = OnnxInt8DynamicPass().run(model, cfg, out, ctx).details
    details["ops"] = _ops(out)
    details["left"] = sorted(p.name for p in ctx.work_dir.rglob("*.onnx"))
    return details


def test_a_slow_conv_integer_candidate_gives_way_to_conv_left_float(tmp_path: Path) -> None:
    probe = ScriptedProbe()
    details = _run(tmp_path, probe)
    first, last = details["attempts"][0], details["attempts"][-1]
    assert first["attempt"] == "requested" and first["slower"] is True
    assert first["latencyMs"] == {"original": 10.0, "quantized": 30.0, "runs": 20}
    # perChannel (no change to the op types) is skipped: the next try leaves Conv float,
    # and, as that passes too, once more with the Conv weights stored INT8
    labels = ["requested", "denseOpsOnly", "convWeightsInt8"]
    assert [a["attempt"] for a in details["attempts"]] == labels
    assert last["probe"]["ok"] is True and "slower" not in last
    assert probe.calls == [(True, True), (False, False), (False, False)]
    assert "ConvInteger" not in details["ops"] and "MatMulInteger" in details["ops"]
    assert {"Cast", "Conv"} <= details["ops"] and details["weightOnlyLayers"] > 0
    assert details["probePassed"] is True and details["chosenAttempt"] == "convWeightsInt8"
    assert [n for n in details["left"] if n != "preprocessed.onnx"] == []
    [note] = _note(details)
    assert note.startswith("m.onnx: INT8 fell back to convWeightsInt8")
    assert "Conv weights stored INT8, computed in float" in note
    assert "within tolerance, but 3.00x the original's latency (30 vs 10 ms)" in note
    assert "with its Conv layers in INT8" in note


def test_the_slow_candidate_stays_when_no_faster_one_is_accurate(tmp_path: Path) -> None:
    details = _run(tmp_path, ScriptedProbe(dense_fails=True))
    labels = [a["attempt"] for a in details["attempts"]]
    assert labels[:2] == ["requested", "denseOpsOnly"]
    assert "nodeRecovery" not in labels  # an accurate candidate exists: nothing to recover
    assert "ConvInteger" in details["ops"]  # validation judges it (NoGain, with the hint)
    assert details["probePassed"] is True and details["chosenAttempt"] == "requested"
    assert _note(details) == []  # the requested configuration is what was published
    assert [n for n in details["left"] if n != "preprocessed.onnx"] == []


@pytest.mark.parametrize("config", [{"requireGain": False}, {"strict": True}])
def test_no_timing_when_gain_is_not_required_or_settings_are_strict(
    tmp_path: Path, config: dict
) -> None:
    probe = ScriptedProbe()
    details = _run(tmp_path, probe, **config)
    assert all(not timed for timed, _ in probe.calls)
    assert "ConvInteger" in details["ops"]
    assert "slower" not in details["attempts"][0]


def test_static_int8_with_slow_conv_layers_leaves_conv_float(tmp_path: Path) -> None:
    """QDQ: a Conv whose weight comes from a DequantizeLinear runs as QLinearConv."""
    from corpus.runs import calibration_files

    model = build_corpus()["speech_encoder"]
    probe = ScriptedProbe()
    ctx = PassContext(
        work_dir=tmp_path / "work", probe=probe,
        calibration_files=calibration_files(model, tmp_path / "calibration"),
    )  # fmt: skip
    ctx.work_dir.mkdir()
    cfg = QuantizationConfig.model_validate(
        {"precision": "int8", "mode": "static", "calibration": {"uri": "file:///c/"}}
    )
    out = tmp_path / "out" / "m.onnx"
    details = OnnxInt8StaticPass().run(model.path, cfg, out, ctx).details
    first = details["attempts"][0]
    assert first["quantizedConv"] > 0 and first["slower"] is True
    assert details["chosenAttempt"] == "denseOpsOnly" and details["quantizedConv"] == 0
    assert _int8_conv(out) == 0 and probe.calls[0] == (True, True)


def test_a_timed_probe_times_both_models_as_validation_does(tmp_path: Path) -> None:
    model = build_corpus()["speech_encoder"]
    ref = reference(model, "int8-dynamic")
    assert ref.probe(model.path).latency is None  # untimed by default
    result = ref.probe(model.path, timed=True)  # the original against itself
    lat = result.latency
    assert result.ok and lat is not None
    assert lat["runs"] >= 1 and lat["original"] > 0 and lat["quantized"] > 0
    ratio = lat.get("interleavedRatio")  # a slowdown of the medians confirmed in blocks
    assert result.slower == slower(lat["original"], lat["quantized"], int(lat["runs"]), ratio)
    # kept for validation: the probe's median (a noisy block that read slower was confirmed
    # in blocks of each model in turn, which leave the medians as they were)
    assert ref.latency is not None and ref.latency[0] >= lat["original"]
