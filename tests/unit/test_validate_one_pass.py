"""One FP32 pass over the validation samples gives the reference outputs and the activation
ranges (validate/ranges.py RangeRecorder, validate/compare.py Reference), and a large
model's reference session is not kept beside the conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SPEECH_WAV

import kquant_job.validate.compare as compare
import kquant_job.validate.ranges as ranges_mod
from kquant_api import DEFAULT_TOLERANCE, Precision, QuantizationJobSpec, ValidationConfig
from kquant_job.audio import frame_feeds, read_wav
from kquant_job.validate import Reference, validate_onnx
from kquant_job.validate.ranges import RangeRecorder, activation_ranges
from kquant_job.validate.runtime import make_session, run_stream
from kquant_job.validate.validators import OnnxValidator

CPU = ["CPUExecutionProvider"]
FEEDBACK = {"stateN": "state"}
TOL = DEFAULT_TOLERANCE[Precision.fp16]


def _feeds(n: int) -> list[dict[str, np.ndarray]]:
    samples, sr = read_wav(SPEECH_WAV)
    extra = {"state": np.zeros((2, 1, 128), np.float32), "sr": np.array(sr, np.int64)}
    return frame_feeds(samples, 512, "input", context=64, extra=extra)[:n]


def _cfg() -> ValidationConfig:
    return ValidationConfig(feedback=FEEDBACK, latencyRuns=3, warmupRuns=1)


def test_the_recorder_runs_as_the_original_and_shows_only_its_outputs(silero_onnx: Path) -> None:
    plain = make_session(silero_onnx, CPU)
    recorder = RangeRecorder(silero_onnx, CPU)
    assert [o.name for o in recorder.get_outputs()] == [o.name for o in plain.get_outputs()]
    assert [i.name for i in recorder.get_inputs()] == [i.name for i in plain.get_inputs()]
    feeds = _feeds(6)
    want, got = run_stream(plain, feeds, FEEDBACK), run_stream(recorder, feeds, FEEDBACK)
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys()
        for name in a:  # unfused graph: the same values up to float rounding
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert recorder.ranges == {}  # nothing recorded unless asked


def test_the_reference_pass_records_the_ranges_a_separate_pass_measures(
    silero_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    feeds = _feeds(12)
    separate = activation_ranges(silero_onnx, feeds, FEEDBACK, CPU, max_samples=8)
    reference = Reference(silero_onnx, feeds, _cfg(), TOL, CPU, ranges=True)
    assert len(reference.outputs) == 12  # every sample, ranges from the first 8
    assert reference.ranges is not None and reference.ranges.keys() == separate.keys()
    for name, value in separate.items():
        assert reference.ranges[name] == pytest.approx(value, rel=1e-4, abs=1e-6)

    def no_second_pass(*_a: object, **_k: object) -> None:
        raise AssertionError("ranges measured twice")

    monkeypatch.setattr(ranges_mod, "activation_ranges", no_second_pass)
    assert reference.activation_ranges() == reference.ranges
    # The unfused recorder is not the latency session: a plain one is made for it.
    assert reference._session is None
    assert not isinstance(reference.session, RangeRecorder)
    outcome = validate_onnx(silero_onnx, silero_onnx, [], _cfg(), TOL, reference=reference)
    assert outcome.passed and outcome.latency_ms["runs"] == 3


def test_without_ranges_a_small_model_keeps_its_session_and_a_large_one_does_not(
    silero_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    feeds = _feeds(4)
    # On the CPU the pass times the original's latency itself and keeps no session
    timed = Reference(silero_onnx, feeds, _cfg(), TOL, CPU)
    assert timed.latency is not None and timed._session is None
    # Timed in alternation later (a GPU's way): a small model's session is kept for it
    monkeypatch.setattr(compare.Reference, "sequential", property(lambda _self: False))
    small = Reference(silero_onnx, feeds, _cfg(), TOL, CPU)
    assert small.ranges is None and small.latency is None and small._session is not None
    monkeypatch.setattr(compare, "KEEP_SESSION_BYTES", 1000)
    large = Reference(silero_onnx, feeds, _cfg(), TOL, CPU)
    assert large._session is None  # released: the conversion runs without it
    outcome = validate_onnx(silero_onnx, silero_onnx, [], _cfg(), TOL, reference=large)
    assert outcome.passed and outcome.latency_ms["original"] > 0
    # A large embedded file gets no recorder (it would be held three times): the ranges
    # are measured on request, on the copy the FP16 pass names.
    spilled = Reference(silero_onnx, feeds, _cfg(), TOL, CPU, ranges=True)
    assert spilled.ranges is None
    assert (
        spilled.activation_ranges().keys()
        == activation_ranges(silero_onnx, feeds, FEEDBACK, CPU).keys()
    )


def test_a_validator_finds_the_same_inputs_and_feedback_on_the_recorder(
    silero_onnx: Path,
) -> None:
    spec = QuantizationJobSpec.model_validate(
        {
            "model": {"uri": "s3://b/m.onnx"},
            "output": {"uri": "s3://b/out/"},
            "quantization": {"precision": "fp16"},
            "validation": {"samples": 6},
        }
    )
    recorded = OnnxValidator(silero_onnx, spec, [], ranges=True)
    plain = OnnxValidator(silero_onnx, spec, [], ranges=False)
    assert recorded.chosen == plain.chosen and recorded.cfg == plain.cfg
    assert recorded.cfg.feedback  # the state loop was found through the recorder
    assert recorded.reference.ranges and plain.reference.ranges is None


class _Tracked:
    """A session standing in for its wrapped one, seen through a weak reference."""

    def __init__(self, session: object) -> None:
        self._session = session

    def __getattr__(self, name: str) -> object:
        return getattr(self._session, name)


@pytest.mark.parametrize("how", ["validate", "probe"])
def test_the_candidate_is_released_before_the_original_is_timed_and_a_slowdown_timed_again(
    silero_onnx: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Validation and the INT8 probe time through one path (Reference.latency_of): the
    candidate's session is gone before the original's is made (two large models' weights
    are never held side by side), and a slowdown is timed again, both models, each keeping
    its faster median. That is a large model's path (past KEEP_SESSION_BYTES, made so here);
    a smaller one's slowdown is confirmed in blocks of both (test_interleaved_timing)."""
    import weakref

    monkeypatch.setattr(compare, "KEEP_SESSION_BYTES", 0)
    feeds = _feeds(3)
    ref = Reference(silero_onnx, feeds, _cfg(), TOL, CPU)
    ref.latency = None  # the original is timed by latency_of, not the reference pass
    candidates: list[weakref.ref[_Tracked]] = []
    alive_when_original_made: list[int] = []
    real = compare.make_session

    def tracked(path: Path, providers: list[str]) -> object:
        if path == silero_onnx:
            alive_when_original_made.append(sum(c() is not None for c in candidates))
            return real(path, providers)
        session = _Tracked(real(path, providers))
        candidates.append(weakref.ref(session))
        return session

    # The candidate (a copy, so the two are told apart) measures 3 ms, then 2 ms; the
    # original 1 ms then 1.5 ms, each over 12 runs: slower by the gain rule.
    medians = iter([3.0, 1.0, 2.0, 1.5])
    monkeypatch.setattr(compare, "make_session", tracked)
    monkeypatch.setattr(compare, "block_latency_ms", lambda *_a: (next(medians), 12))
    candidate = Path(str(silero_onnx) + ".copy.onnx")
    candidate.write_bytes(silero_onnx.read_bytes())
    try:
        if how == "validate":
            outcome = validate_onnx(
                silero_onnx, candidate, [], _cfg(), TOL, reference=ref, confirm_slowdown=True
            )
            latency = outcome.latency_ms
        else:
            result = ref.probe(candidate, timed=True)
            assert result.slower is True
            latency = result.latency
    finally:
        candidate.unlink()
    assert latency == {"original": 1.0, "quantized": 2.0, "runs": 12, "timing": "sequential"}
    assert len(candidates) == 2  # the candidate's session made again for the second round
    assert alive_when_original_made == [0, 0]  # both rounds: no candidate session alive
    assert ref.latency == (1.0, 12)  # the first round's original kept for the next variants
    assert next(medians, None) is None


def test_validation_reuses_the_session_of_the_probe_that_passed_the_same_file(
    silero_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass probes its chosen candidate, then moves it into place: validation loads that
    file once more for nothing (0.3-0.8 s for BERT-base). The probe's session is kept while
    it is of the same file (a rename keeps it); any other file, or the same name rewritten,
    gets a session of its own."""
    import shutil

    from test_reference_cache import _count_sessions

    feeds = _feeds(3)
    ref = Reference(silero_onnx, feeds, _cfg(), TOL, CPU)
    made = _count_sessions(monkeypatch)
    candidate = tmp_path / "scratch" / "model.onnx"
    candidate.parent.mkdir()
    shutil.copyfile(silero_onnx, candidate)
    assert ref.probe(candidate, keep=True).ok and made == ["model.onnx"]
    placed = tmp_path / "staged" / "model_fp16.onnx"
    placed.parent.mkdir()
    candidate.rename(placed)  # as a pass moves its chosen candidate
    outcome = validate_onnx(silero_onnx, placed, [], _cfg(), TOL, reference=ref)
    assert outcome.passed and made == ["model.onnx"]  # no second load of the candidate
    # kept once: the next validation of it loads it again
    validate_onnx(silero_onnx, placed, [], _cfg(), TOL, reference=ref)
    assert made == ["model.onnx", "model_fp16.onnx"]
    # the same name rewritten after the probe: another file, another session
    assert ref.probe(placed, keep=True).ok
    placed.write_bytes(placed.read_bytes())
    validate_onnx(silero_onnx, placed, [], _cfg(), TOL, reference=ref)
    assert made[-2:] == ["model_fp16.onnx", "model_fp16.onnx"]
    # a failed probe keeps nothing
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    assert not ref.probe(broken, keep=True).ok and ref.take_session(broken) is None
    # kept only when asked: FP16's pass does heavy work after its probe
    assert ref.probe(placed).ok and ref.take_session(placed) is None
