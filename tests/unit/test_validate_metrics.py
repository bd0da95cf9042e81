"""Validation metrics and the tolerance check, on arrays whose results are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kquant_api import Tolerance
from kquant_job.validate.metrics import check_tolerance, compare_output

STRICT = Tolerance(maxAbsError=1e-6, minCosineSimilarity=0.999999)


def test_metrics_by_hand():
    # Output "p": one value per sample, as Silero's speech probability.
    m = compare_output(
        "p", [np.array([[0.1]]), np.array([[0.9]])], [np.array([[0.2]]), np.array([[0.8]])]
    )
    assert m.maxAbsError == pytest.approx(0.1)
    assert m.meanAbsError == pytest.approx(0.1)
    # Over the stream: (0.1*0.2 + 0.9*0.8) / (|(0.1, 0.9)| |(0.2, 0.8)|)
    assert m.cosineSimilarity == pytest.approx(0.74 / math.sqrt(0.82 * 0.68))
    assert m.elements == 2 and not m.exact

    # Errors 1, 0 in sample 0 and 0, 3 in sample 1: max 3 (sample 1), mean 1.
    a = [np.array([3.0, 4.0]), np.array([0.0, 5.0])]
    b = [np.array([4.0, 4.0]), np.array([0.0, 2.0])]
    m = compare_output("v", a, b)
    assert (m.maxAbsError, m.meanAbsError, m.worstSample) == (3.0, 1.0, 1)
    assert m.cosineSimilarity == pytest.approx((12 + 16 + 10) / (math.sqrt(50) * math.sqrt(36)))


def test_cosine_edge_cases():
    zeros = [np.zeros(3, np.float32)]
    assert compare_output("z", zeros, zeros).cosineSimilarity == 1.0
    assert compare_output("z", zeros, [np.ones(3, np.float32)]).cosineSimilarity == 0.0
    assert compare_output(
        "n", [np.array([1.0, 2.0])], [np.array([-1.0, -2.0])]
    ).cosineSimilarity == pytest.approx(-1.0)


def test_tolerance_violations_name_output_and_values():
    m = compare_output("stateN", [np.array([0.0, 1.0])], [np.array([0.031, 1.0])])
    assert check_tolerance([m], Tolerance(maxAbsError=0.05)) == []
    v = check_tolerance([m], Tolerance(maxAbsError=0.01, maxMeanAbsError=0.001))
    assert v == [
        "output 'stateN': maxAbsError 0.031 > 0.01",
        "output 'stateN': meanAbsError 0.0155 > 0.001",
    ]
    m = compare_output("p", [np.array([1.0, 0.0])], [np.array([1.0, 0.05])])
    (msg,) = check_tolerance([m], Tolerance(minCosineSimilarity=0.999))
    assert msg.startswith("output 'p': cosineSimilarity 0.998") and msg.endswith("< 0.999")
    assert check_tolerance([m], Tolerance()) == []  # no bounds set: nothing to break


def test_new_nan_inf_always_violate_and_are_counted():
    orig = [np.array([1.0, np.nan, 2.0]), np.array([3.0, 4.0, 5.0], np.float32)]
    conv = [np.array([1.0, np.nan, 2.0]), np.array([np.inf, np.nan, 5.0], np.float16)]
    m = compare_output("y", orig, conv)
    assert (m.nanOriginal, m.infOriginal, m.nanConverted, m.infConverted) == (1, 0, 2, 1)
    assert m.newNonFinite == 2 and m.worstSample == 1
    assert m.maxAbsError == 0.0  # over the values finite in both
    (msg,) = check_tolerance([m], Tolerance())
    assert "2 NaN/Inf" in msg and "sample 1" in msg
    # NaN where the original has NaN too is no new failure.
    same = compare_output("y", orig[:1], conv[:1])
    assert same.newNonFinite == 0 and check_tolerance([same], STRICT) == []


def test_integer_outputs_must_match_exactly():
    m = compare_output(
        "ids", [np.array([1, 2, 3]), np.array([4, 5])], [np.array([1, 2, 3]), np.array([4, 6])]
    )
    assert m.exact and m.mismatches == 1 and m.worstSample == 1 and m.elements == 5
    (msg,) = check_tolerance([m], Tolerance(maxAbsError=10.0))
    assert "1 of 5 integer values differ" in msg
    ok = compare_output("mask", [np.array([True, False])], [np.array([True, False])])
    assert ok.mismatches == 0 and check_tolerance([ok], STRICT) == []


def test_shape_mismatch_violates():
    m = compare_output(
        "y", [np.zeros((1, 2)), np.zeros((1, 2))], [np.zeros((1, 2)), np.zeros((1, 3))]
    )
    assert m.shapeMismatches == 1 and m.worstSample == 1 and m.maxAbsError == 0.0
    (msg,) = check_tolerance([m], Tolerance())
    assert "shape differs" in msg
