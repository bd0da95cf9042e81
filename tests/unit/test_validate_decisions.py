"""Tolerances on decisions (kquant_job.validate.decisions): threshold decisions and the
segments they yield, argmax agreement, and their violations in the tolerance check."""

from __future__ import annotations

import numpy as np

from kquant_api import Tolerance
from kquant_api.spec import DecisionRule
from kquant_job.validate.compare import compare_outputs
from kquant_job.validate.decisions import compare_decisions, segments
from kquant_job.validate.metrics import check_tolerance

VAD = DecisionRule(threshold=0.5, minAgreement=0.95, maxBoundaryShift=1)


def stream(values: list[float]) -> list[np.ndarray]:
    """One speech probability per sample, as Silero VAD outputs it ([1, 1])."""
    return [np.array([[v]], np.float32) for v in values]


def test_segments_are_the_runs_of_positive_decisions():
    assert segments(np.array([0, 1, 1, 0, 1, 0, 0, 1], bool)) == [(1, 3), (4, 5), (7, 8)]
    assert segments(np.zeros(4, bool)) == []


def test_a_segment_starting_a_frame_later_shows_as_a_boundary_shift():
    original = stream([0.1, 0.2, 0.9, 0.95, 0.9, 0.1, 0.1, 0.8, 0.9, 0.2])
    later = stream([0.1, 0.2, 0.4, 0.95, 0.9, 0.1, 0.1, 0.8, 0.9, 0.2])  # first onset late
    m = compare_decisions(VAD, original, later)
    assert (m.segmentsOriginal, m.segmentsConverted, m.maxBoundaryShift) == (2, 2, 1)
    assert m.agreement == 0.9 and m.decisions == 10
    strict = DecisionRule(threshold=0.5, minAgreement=0.95, maxBoundaryShift=0)
    metrics = compare_outputs([{"p": a} for a in original], [{"p": b} for b in later],
                              {"p": strict})  # fmt: skip
    violations = check_tolerance(metrics, Tolerance(decisions={"p": strict}))
    assert any("agree on 0.9000 < 0.95 of 10" in v for v in violations), violations
    assert any("moves by 1 decisions > 0" in v for v in violations), violations
    # numerically small: one value off by 0.5 in ten, a mean abs error of 0.05
    assert abs(metrics[0].meanAbsError - 0.05) < 1e-6


def test_a_split_segment_changes_the_count():
    original = stream([0.9, 0.9, 0.9, 0.9])
    split = stream([0.9, 0.49, 0.9, 0.9])
    m = compare_decisions(VAD, original, split)
    assert (m.segmentsOriginal, m.segmentsConverted, m.maxBoundaryShift) == (1, 2, None)
    metrics = compare_outputs([{"p": a} for a in original], [{"p": b} for b in split],
                              {"p": VAD})  # fmt: skip
    assert any("2 segments (threshold at 0.5) where the original has 1" in v
               for v in check_tolerance(metrics, Tolerance(decisions={"p": VAD})))  # fmt: skip


def test_argmax_agreement_per_frame():
    rule = DecisionRule(kind="argmax", minAgreement=0.99)
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((1, 20, 8)).astype(np.float32) for _ in range(3)]
    nudged = [x.copy() for x in logits]
    top = np.argmax(nudged[0][0, 0])
    nudged[0][0, 0, (top + 1) % 8] = nudged[0][0, 0, top] + 1.0  # frame 0 of sample 0 flips
    m = compare_decisions(rule, logits, nudged)
    assert m.decisions == 60 and m.agreement == 59 / 60
    metrics = compare_outputs([{"l": a} for a in logits], [{"l": b} for b in nudged], {"l": rule})
    [violation] = check_tolerance(metrics, Tolerance(decisions={"l": rule}))
    assert "decisions (argmax) agree on 0.9833 < 0.99 of 60" in violation
    assert metrics[0].to_dict()["decisionAgreement"] == 59 / 60


def test_a_rule_for_an_output_the_model_lacks_is_a_violation():
    metrics = compare_outputs([{"p": np.ones(2)}], [{"p": np.ones(2)}], {"q": VAD})
    [violation] = check_tolerance(metrics, Tolerance(decisions={"q": VAD}))
    assert "decision rule for output 'q': the model has no such output (outputs: p)" in violation


def test_the_positive_decisions_of_the_original_are_counted_and_reported():
    original = stream([0.9, 0.9, 0.2, 0.9])
    m = compare_decisions(VAD, original, stream([0.9, 0.9, 0.9, 0.9]))
    assert (m.decisions, m.positiveOriginal) == (4, 3)
    [out] = compare_outputs([{"p": a} for a in original], [{"p": a} for a in original],
                            {"p": VAD})  # fmt: skip
    flat = out.to_dict()
    assert (flat["decisions"], flat["positiveOriginal"], flat["segmentsOriginal"]) == (4, 3, 2)
