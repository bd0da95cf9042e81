"""Latency within a bounded time: the original and the converted model are timed in
alternation (GPU) or one after the other (CPU) until latencyRuns runs or until
latencyBudgetMs is spent, and the result says how many runs it took; NoGain's latency rule
counts the runs actually timed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pytest import approx

from kquant_api import QuantizationConfig, ValidationConfig, ValidationSummary
from kquant_job.gain import gain_shortfalls
from kquant_job.validate import validate_onnx
from kquant_job.validate.inputs import prepare_feeds
from kquant_job.validate.runtime import block_latency_ms, paired_latency_ms


def _sleeper(ms: float, log: list[str], tag: str):
    def call() -> None:
        log.append(tag)
        time.sleep(ms / 1000.0)

    return call


def _clocked(monkeypatch: pytest.MonkeyPatch):
    """Calls that take a fixed time on a clock of their own (runtime's ``perf_counter``): a
    loaded machine's oversleeping moves no count or median. Returns ``make(ms, log, tag)``."""
    import kquant_job.validate.runtime as runtime

    now = [0.0]
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(runtime, "settle", lambda: None)

    def make(ms: float, log: list[str], tag: str):
        def call() -> None:
            log.append(tag)
            now[0] += ms / 1000.0

        return call

    return make


def test_the_budget_stops_timing_and_says_how_many_runs(monkeypatch) -> None:
    log: list[str] = []
    make = _clocked(monkeypatch)
    out = paired_latency_ms(make(10, log, "a"), make(30, log, "b"), 1000, 2, 200)
    # pairs of 40 ms within a 200 ms budget: 5, far from the 1000 asked
    assert (out["runs"], out["original"], out["quantized"]) == (5, approx(10), approx(30))
    assert log[:4] == ["a", "b", "a", "b"]  # warm-up pairs, then timed pairs, alternating
    assert len(log) == 2 * (2 + out["runs"])
    monkeypatch.undo()
    real: list[str] = []  # and on the real clock, sleeping
    out = paired_latency_ms(_sleeper(10, real, "a"), _sleeper(30, real, "b"), 1000, 2, 200)
    assert 1 <= out["runs"] <= 6 and out["quantized"] > out["original"] >= 10


def test_runs_cap_the_timing_and_one_pair_is_always_timed() -> None:
    log: list[str] = []
    assert paired_latency_ms(_sleeper(0, log, "a"), _sleeper(0, log, "b"), 7, 0, 1e9)["runs"] == 7
    assert paired_latency_ms(_sleeper(5, log, "a"), _sleeper(5, log, "b"), 50, 0, 1e-6)["runs"] == 1


def test_a_block_stops_at_its_budget_or_its_runs(monkeypatch) -> None:
    log: list[str] = []
    median, runs = block_latency_ms(_clocked(monkeypatch)(20, log, "a"), 1000, 2, 100)
    assert (median, runs) == (approx(20), 5)  # 20 ms runs in 100 ms
    assert len(log) == 2 + runs
    monkeypatch.undo()
    assert block_latency_ms(_sleeper(0, log, "a"), 7, 0, 1e9)[1] == 7
    assert block_latency_ms(_sleeper(5, log, "a"), 50, 0, 1e-6)[1] == 1


def test_cpu_validation_times_each_model_in_a_block_of_its_own(
    silero_onnx, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequential timing: the original's block in the reference pass, on its session, then
    the converted model's, never interleaved; no second session of the original."""
    import kquant_job.validate.compare as compare
    from kquant_api import DEFAULT_TOLERANCE, Precision

    cfg = ValidationConfig.model_validate({"samples": 2, "latencyRuns": 5, "warmupRuns": 1})
    feeds = prepare_feeds(silero_onnx, cfg, [])
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(silero_onnx.read_bytes())
    order: list[str] = []
    real = compare.session_call

    def tagged(session, feed):
        call = real(session, feed)
        tag = "converted" if "copy.onnx" in str(session._model_path) else "original"

        def run() -> object:
            order.append(tag)
            return call()

        return run

    made: list[str] = []
    real_make = compare.make_session

    def counted(path, providers):
        made.append(Path(path).name)
        return real_make(path, providers)

    monkeypatch.setattr(compare, "session_call", tagged)
    monkeypatch.setattr(compare, "make_session", counted)
    outcome = validate_onnx(silero_onnx, copy, feeds, cfg, DEFAULT_TOLERANCE[Precision.fp16])
    assert outcome.latency_ms["timing"] == "sequential" and outcome.latency_ms["runs"] == 5
    assert order == ["original"] * 6 + ["converted"] * 6  # warm-up + 5 timed each
    assert made == [silero_onnx.name, "copy.onnx"]  # the original's one session serves both


def test_a_range_recorder_is_not_timed_the_original_is_timed_after(
    silero_onnx, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reference pass that recorded activation ranges ran an unoptimized graph: the
    original is timed on a plain session of its own, after the converted model."""
    import kquant_job.validate.compare as compare
    from kquant_api import DEFAULT_TOLERANCE, Precision

    cfg = ValidationConfig.model_validate({"samples": 2, "latencyRuns": 3, "warmupRuns": 0})
    feeds = prepare_feeds(silero_onnx, cfg, [])
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(silero_onnx.read_bytes())
    tolerance = DEFAULT_TOLERANCE[Precision.fp16]
    ref = compare.Reference(silero_onnx, feeds, cfg, tolerance, ranges=True)
    assert ref.ranges and ref.latency is None
    order: list[str] = []
    real = compare.session_call

    def tagged(session, feed):
        call = real(session, feed)
        order.append("converted" if "copy.onnx" in str(session._model_path) else "original")
        return call

    monkeypatch.setattr(compare, "session_call", tagged)
    outcome = validate_onnx(silero_onnx, copy, feeds, cfg, tolerance, reference=ref)
    assert order == ["converted", "original"]
    assert outcome.latency_ms["runs"] == 3


def test_validation_reports_the_runs_it_timed(silero_onnx) -> None:
    cfg = ValidationConfig.model_validate({"samples": 2, "latencyRuns": 4, "warmupRuns": 1})
    feeds = prepare_feeds(silero_onnx, cfg, [])
    from kquant_api import DEFAULT_TOLERANCE, Precision

    outcome = validate_onnx(silero_onnx, silero_onnx, feeds, cfg, DEFAULT_TOLERANCE[Precision.fp16])
    assert outcome.latency_ms["runs"] == 4
    assert outcome.summary().latencyMs.runs == 4
    tight = cfg.model_copy(update={"latencyRuns": 10_000, "latencyBudgetMs": 1.0})
    outcome = validate_onnx(
        silero_onnx, silero_onnx, feeds, tight, DEFAULT_TOLERANCE[Precision.fp16]
    )
    assert 1 <= outcome.latency_ms["runs"] < 10_000


def test_no_gain_counts_the_runs_actually_timed() -> None:
    config = QuantizationConfig(precision="int8")
    slow = ValidationSummary(passed=True, samples=4, device="cpu",
                             latencyMs={"original": 1.0, "quantized": 1.5, "runs": 3})  # fmt: skip
    # 3 timed runs decide only past 2x, whatever latencyRuns asked for
    assert gain_shortfalls(config, 100, 50, slow, slow.latencyMs.runs) == []
    assert gain_shortfalls(config, 100, 50, slow, 20) != []


@pytest.mark.parametrize(
    ("second", "expected"),
    [((0.5, 0.5), (0.5, 0.5)),  # a slowdown the second round does not show: not slower
     ((1.0, 0.5), (1.0, 0.5))],  # confirmed: the report still says slower
)  # fmt: skip
def test_a_slowdown_is_timed_again_before_it_counts(
    silero_onnx, tmp_path, monkeypatch: pytest.MonkeyPatch, second, expected
) -> None:
    """A new user saw the same INT8 bytes judged NoGain once (1.54x, 0.1 ms slower) and
    Validated seven times: one sequential round on a busy machine decided the verdict. A
    model past KEEP_SESSION_BYTES (made so here) is timed again one model after the other;
    a smaller one in blocks of each in turn (test_interleaved_timing)."""
    import kquant_job.validate.compare as compare
    from kquant_api import DEFAULT_TOLERANCE, Precision
    from kquant_job.gain import slower

    monkeypatch.setattr(compare, "KEEP_SESSION_BYTES", 0)

    cfg = ValidationConfig.model_validate({"samples": 2, "latencyRuns": 10, "warmupRuns": 0})
    feeds = prepare_feeds(silero_onnx, cfg, [])
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(silero_onnx.read_bytes())
    # reference pass (original), converted, then (on a slowdown) converted, original again
    medians = iter([0.5, 1.0, *second])
    monkeypatch.setattr(compare, "block_latency_ms", lambda *a: (next(medians), 10))
    tol = DEFAULT_TOLERANCE[Precision.int8]
    ref = compare.Reference(silero_onnx, feeds, cfg, tol)
    outcome = validate_onnx(silero_onnx, copy, [], cfg, tol, reference=ref, confirm_slowdown=True)
    got = (outcome.latency_ms["quantized"], outcome.latency_ms["original"])
    assert got == expected and slower(got[1], got[0]) == (expected == (1.0, 0.5))
    # without a gain rule to feed (FP16), one round
    medians = iter([0.5, 1.0])
    ref = compare.Reference(silero_onnx, feeds, cfg, tol)
    outcome = validate_onnx(silero_onnx, copy, [], cfg, tol, reference=ref)
    assert (outcome.latency_ms["quantized"], outcome.latency_ms["original"]) == (1.0, 0.5)


def _scripted_clock(monkeypatch: pytest.MonkeyPatch, durations_ms: list[float]):
    """A call taking the next of ``durations_ms`` on a clock of its own (runtime's
    ``time.perf_counter``), cycling; returns the call and the list of calls made."""
    import kquant_job.validate.runtime as runtime

    now = [0.0]
    made: list[float] = []

    def call() -> None:
        made.append(durations_ms[len(made) % len(durations_ms)])
        now[0] += made[-1] / 1000.0

    monkeypatch.setattr(runtime.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(runtime, "settle", lambda: None)
    return call, made


def test_a_median_known_to_the_precision_stops_timing_after_ten_runs(monkeypatch) -> None:
    from kquant_job.validate.runtime import median_known

    assert not median_known([5.0] * 9, 0.02)  # too few for the gain rule's margins
    assert median_known([5.0] * 10, 0.02)
    assert not median_known([5.0] * 10, 0.0)  # precision 0: never early
    # 10 runs: the interval runs from the 2nd to the 9th smallest (Campbell & Gardner)
    spread = [4.9, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.3, 9.0]  # half-width 0.15: 3 %
    assert median_known(spread, 0.04) and not median_known(spread, 0.02)
    assert not median_known([*spread[:8], 5.6, 9.0], 0.04)  # the 9th counts, 6 %
    steady, made = _scripted_clock(monkeypatch, [5.0, 5.05, 4.95])
    assert block_latency_ms(steady, 20, 2, 1e9, 0.02) == (pytest.approx(5.0), 10)
    assert len(made) == 12  # two warm-ups, ten timed
    assert block_latency_ms(steady, 20, 0, 1e9, 0.0)[1] == 20  # precision 0: every run
    noisy, _ = _scripted_clock(monkeypatch, [5.0, 8.0])  # the median never settles to 2 %
    assert block_latency_ms(noisy, 20, 0, 1e9, 0.02)[1] == 20


def test_paired_timing_stops_once_both_medians_are_known(monkeypatch) -> None:
    steady, _ = _scripted_clock(monkeypatch, [5.0])
    out = paired_latency_ms(steady, steady, 50, 1, 1e9, 0.02)
    assert out["runs"] == 10 and out["original"] == pytest.approx(5.0)
    # one side noisy (every other of its runs 60 % longer): every pair asked is timed
    calls = iter([5.0, 5.0, 5.0, 8.0] * 100)
    now = [0.0]
    import kquant_job.validate.runtime as runtime

    def step() -> None:
        now[0] += next(calls) / 1000.0

    monkeypatch.setattr(runtime.time, "perf_counter", lambda: now[0])
    assert paired_latency_ms(step, step, 30, 0, 1e9, 0.02)["runs"] == 30
