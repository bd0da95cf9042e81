"""Latency within a bounded time: the original and the converted model are timed in
alternation until latencyRuns pairs or until latencyBudgetMs is spent, and the result says
how many runs it took; NoGain's latency rule counts the runs actually timed."""

from __future__ import annotations

import time

import pytest

from kquant_api import QuantizationConfig, ValidationConfig, ValidationSummary
from kquant_job.gain import gain_shortfalls
from kquant_job.validate import validate_onnx
from kquant_job.validate.inputs import prepare_feeds
from kquant_job.validate.runtime import paired_latency_ms


def _sleeper(ms: float, log: list[str], tag: str):
    def call() -> None:
        log.append(tag)
        time.sleep(ms / 1000.0)

    return call


def test_the_budget_stops_timing_and_says_how_many_runs() -> None:
    log: list[str] = []
    out = paired_latency_ms(_sleeper(10, log, "a"), _sleeper(30, log, "b"), 1000, 2, 200)
    # pairs of ~40 ms within a 200 ms budget: about 5, far from the 1000 asked
    assert 3 <= out["runs"] <= 6
    assert out["original"] == pytest.approx(10, abs=5)
    assert out["quantized"] == pytest.approx(30, abs=10)
    assert log[:4] == ["a", "b", "a", "b"]  # warm-up pairs, then timed pairs, alternating
    assert len(log) == 2 * (2 + out["runs"])


def test_runs_cap_the_timing_and_one_pair_is_always_timed() -> None:
    log: list[str] = []
    assert paired_latency_ms(_sleeper(0, log, "a"), _sleeper(0, log, "b"), 7, 0, 1e9)["runs"] == 7
    assert paired_latency_ms(_sleeper(5, log, "a"), _sleeper(5, log, "b"), 50, 0, 1e-6)["runs"] == 1


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
                             latencyMs={"original": 1.0, "quantized": 3.0, "runs": 3})  # fmt: skip
    # 3 timed runs decide nothing, whatever latencyRuns asked for
    assert gain_shortfalls(config, 100, 50, slow, slow.latencyMs.runs) == []
    assert gain_shortfalls(config, 100, 50, slow, 20) != []
