"""Validation on real models: providers, sizes, streaming, probes and full comparisons."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SPEECH_WAV
from onnx import TensorProto, helper, numpy_helper

from kquant_api import DEFAULT_TOLERANCE, Precision, Tolerance, ValidationConfig
from kquant_job.audio import frame_feeds, read_wav, thread_state
from kquant_job.errors import InvalidSpec, PassError
from kquant_job.validate import Reference, prepare_feeds, select_providers, validate_onnx
from kquant_job.validate.runtime import make_session, model_bytes, run_stream

FEEDBACK = {"stateN": "state"}
STRICT = Tolerance(maxAbsError=1e-6, minCosineSimilarity=0.999999)


# ---------------------------------------------------------------- models


def save(graph: onnx.GraphProto, path: Path, **kwargs) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what onnxruntime >= 1.16 reads
    onnx.save(model, str(path), **kwargs)
    return path


def linear_model(
    path: Path, n_in: int = 16, n_out: int = 8, fixed: int | None = None, **kw
) -> Path:
    """y = x @ W + b with seeded weights; ``fixed`` pins the batch dim."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), "b")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [fixed or "batch", n_in])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [fixed or "batch", n_out])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
    ]
    return save(helper.make_graph(nodes, "lin", [x], [y], initializer=[w, b]), path, **kw)


def scaled_silero(src: Path, dst: Path, factor: float) -> Path:
    """Silero VAD with every weight tensor (Constant of >= 64 floats, in the If branches)
    multiplied by ``factor``: a deliberately wrong 'conversion'."""
    model = onnx.load(str(src))

    def scale(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    scale(attr.g)
                elif node.op_type == "Constant" and attr.name == "value":
                    arr = numpy_helper.to_array(attr.t)
                    if arr.dtype == np.float32 and arr.size >= 64:
                        attr.t.CopyFrom(numpy_helper.from_array(arr * factor, attr.t.name))

    scale(model.graph)
    onnx.save(model, str(dst))
    return dst


def speech_feeds(n: int) -> list[dict[str, np.ndarray]]:
    samples, sr = read_wav(SPEECH_WAV)
    extra = {"state": np.zeros((2, 1, 128), np.float32), "sr": np.array(sr, np.int64)}
    return frame_feeds(samples, 512, "input", context=64, extra=extra)[:n]


def stream_cfg(**kw) -> ValidationConfig:
    return ValidationConfig(feedback=FEEDBACK, latencyRuns=3, warmupRuns=1, **kw)


# ---------------------------------------------------------------- runtime


def test_select_providers_matches_this_onnxruntime():
    import onnxruntime as ort

    providers, device = select_providers()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert (providers[0], device) == ("CUDAExecutionProvider", "cuda")
    else:
        assert (providers, device) == (["CPUExecutionProvider"], "cpu")
        with pytest.raises(InvalidSpec, match="CUDA"):
            select_providers("cuda")
    assert select_providers("cpu") == (["CPUExecutionProvider"], "cpu")
    with pytest.raises(InvalidSpec):
        select_providers("tpu")


def test_model_bytes_counts_external_data(tmp_path):
    plain = linear_model(tmp_path / "plain.onnx", n_in=64, n_out=64)
    assert model_bytes(plain) == plain.stat().st_size
    ext = linear_model(
        tmp_path / "ext.onnx",
        n_in=64,
        n_out=64,
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    data = tmp_path / "ext.onnx.data"
    assert data.stat().st_size >= 64 * 64 * 4
    assert model_bytes(ext) == ext.stat().st_size + data.stat().st_size


def test_run_stream_threads_each_models_own_state(silero_onnx):
    feeds = speech_feeds(30)
    session = make_session(silero_onnx, ["CPUExecutionProvider"])
    streamed = run_stream(session, feeds, FEEDBACK)
    independent = run_stream(session, feeds, {})
    threaded = run_stream(session, thread_state(silero_onnx, feeds, FEEDBACK), {})
    assert np.array_equal(streamed[0]["stateN"], independent[0]["stateN"])  # same first step
    assert not np.allclose(streamed[-1]["stateN"], independent[-1]["stateN"])
    for a, b in zip(streamed, threaded, strict=True):
        np.testing.assert_allclose(a["output"], b["output"], atol=1e-6)
    with pytest.raises(InvalidSpec, match="no output 'hn'"):
        run_stream(session, feeds, {"hn": "state"})


# ---------------------------------------------------------------- full comparisons


def test_silero_against_itself_passes_with_zero_error(silero_onnx):
    feeds = speech_feeds(40)
    outcome = validate_onnx(silero_onnx, silero_onnx, feeds, stream_cfg(), STRICT)
    assert outcome.passed and outcome.violations == [] and outcome.samples == 40
    assert set(outcome.metrics) == {"output", "stateN"}
    for m in outcome.metrics.values():
        assert m.maxAbsError == 0.0 and m.meanAbsError == 0.0
        assert m.cosineSimilarity == pytest.approx(1.0, abs=1e-12)
    assert outcome.original_bytes == outcome.quantized_bytes == silero_onnx.stat().st_size
    assert set(outcome.latency_ms) == {"original", "quantized", "runs", "timing"}
    assert outcome.latency_ms["timing"] == "sequential"  # CPU sessions: one after the other
    assert all(outcome.latency_ms[k] > 0 for k in ("original", "quantized"))
    assert outcome.latency_ms["runs"] == stream_cfg().latencyRuns
    summary = outcome.summary()
    assert summary.passed and summary.maxAbsError == 0.0 and summary.latencyMs.original > 0
    report = json.loads(json.dumps(outcome.to_report()))
    assert report["feedback"] == FEEDBACK and report["outputs"]["stateN"]["elements"] == 40 * 256


def test_perturbed_silero_fails_with_violations(silero_onnx, tmp_path):
    bad = scaled_silero(silero_onnx, tmp_path / "scaled.onnx", 1.1)
    feeds = speech_feeds(40)
    tol = DEFAULT_TOLERANCE[Precision.fp16]
    outcome = validate_onnx(silero_onnx, bad, feeds, stream_cfg(), tol)
    assert not outcome.passed
    assert any(v.startswith("output 'stateN': meanAbsError") for v in outcome.violations)
    assert outcome.metrics["stateN"].meanAbsError > tol.maxMeanAbsError
    assert outcome.summary().maxAbsError == outcome.metrics["stateN"].maxAbsError

    reference = Reference(silero_onnx, feeds, stream_cfg(), tol)
    probe = reference.probe(bad)
    assert not probe.ok and probe.error is None and probe.violations
    assert probe.metrics["stateN"]["elements"] == 8 * 256  # the first 8 samples only
    assert reference.probe(silero_onnx).ok


def test_probe_reports_load_failure(silero_onnx, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(silero_onnx.read_bytes()[:5000])  # truncated protobuf
    reference = Reference(silero_onnx, speech_feeds(4), stream_cfg(), STRICT)
    result = reference.probe(broken)
    assert (
        not result.ok and result.error.startswith("load failed") and "broken.onnx" in result.error
    )
    outcome = validate_onnx(silero_onnx, broken, [], stream_cfg(), STRICT, reference=reference)
    assert not outcome.passed and "failed to load" in outcome.error and outcome.latency_ms is None


def test_converted_model_that_cannot_run_fails_validation(tmp_path):
    original = linear_model(tmp_path / "a.onnx")
    fixed = linear_model(tmp_path / "b.onnx", fixed=1)  # batch pinned to 1
    cfg = ValidationConfig.model_validate(
        {"samples": 2, "dimensions": {"batch": 3}, "latencyRuns": 1}
    )
    feeds = prepare_feeds(original, cfg, [])
    outcome = validate_onnx(original, fixed, feeds, cfg, STRICT)
    assert not outcome.passed and "failed to run" in outcome.error and "sample 0" in outcome.error
    assert outcome.to_report()["error"] == outcome.error


def test_original_that_cannot_run_on_the_feeds_is_invalid_spec(silero_onnx, tmp_path):
    from kquant_job.validate.inputs import generate_feeds, numpy_dtype

    cfg = ValidationConfig(samples=1)  # the generic generator: sr random, input (1, 1)
    session = make_session(silero_onnx, ["CPUExecutionProvider"])
    signature = [(i.name, i.shape, numpy_dtype(i.type)) for i in session.get_inputs()]
    feeds = generate_feeds(signature, cfg)
    with pytest.raises(InvalidSpec, match=r"spec\.validation\.inputs"):
        Reference(silero_onnx, feeds, cfg, STRICT)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(PassError) as info:
        Reference(junk, feeds, cfg, STRICT)
    assert info.value.reason.value == "CorruptModel"


def test_fp16_inputs_are_cast_for_the_converted_model(tmp_path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    original = linear_model(tmp_path / "fp32.onnx")
    fp16 = convert_float_to_float16(onnx.load(str(original)), keep_io_types=False)
    onnx.save(fp16, str(tmp_path / "fp16.onnx"))
    cfg = ValidationConfig.model_validate(
        {"samples": 4, "dimensions": {"batch": 2}, "latencyRuns": 2}
    )
    assert (
        make_session(tmp_path / "fp16.onnx", ["CPUExecutionProvider"]).get_inputs()[0].type
        == "tensor(float16)"
    )
    feeds = prepare_feeds(original, cfg, [])
    outcome = validate_onnx(
        original, tmp_path / "fp16.onnx", feeds, cfg, DEFAULT_TOLERANCE[Precision.fp16]
    )
    m = outcome.metrics["y"]
    assert outcome.passed, outcome.violations
    assert 0 < m.maxAbsError < 1e-2  # FP16 rounding is visible, and small
    assert outcome.quantized_bytes < outcome.original_bytes


def test_generated_silero_feeds_with_overrides_validate(silero_onnx):
    cfg = ValidationConfig.model_validate(
        {
            "samples": 6,
            "feedback": FEEDBACK,
            "inputs": {"input": {"shape": [1, 576]}, "sr": {"value": 16000}, "state": {"value": 0}},
            "latencyRuns": 1,
        }
    )
    feeds = prepare_feeds(silero_onnx, cfg, [])
    assert feeds[0]["sr"].shape == () and feeds[0]["sr"] == 16000
    assert validate_onnx(silero_onnx, silero_onnx, feeds, cfg, STRICT).passed
