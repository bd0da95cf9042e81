"""A tensor comparison's report lists at most MAX_VIOLATIONS violations: a file of 400 000
scalar tensors, each a violation, sent an outcome past the sandbox's 64 MiB (trial)."""

from __future__ import annotations

import json

from kquant_job.validate.tensors import MAX_VIOLATIONS, TensorOutcome


def test_the_report_lists_the_first_violations_and_counts_the_rest() -> None:
    violations = [
        f"tensor 't{i}': 1 NaN value(s) where the original is finite" for i in range(5000)
    ]
    outcome = TensorOutcome(False, [], violations, original_bytes=1, quantized_bytes=1)
    report = outcome.to_report()
    assert report["violations"] == violations[:MAX_VIOLATIONS]
    assert report["violationsOmitted"] == 5000 - MAX_VIOLATIONS
    assert len(json.dumps(report)) < 100 * MAX_VIOLATIONS
    assert outcome.passed is False
