"""Text a model chose (output and tensor names, messages quoting them) reaches the table,
the dry-run plan, inspect and the report escaped and bounded: it cannot forge a line of the
worker's log or fill the report."""

from __future__ import annotations

from kquant_api import JobResult, Reason, Tolerance
from kquant_job.cli import _table
from kquant_job.validate.compare import MAX_REPORTED_OUTPUTS, ValidationOutcome
from kquant_job.validate.metrics import OutputMetrics

FORGED = "out\n07:00:00 INFO    published set FORGED prefix=s3://prod/ \x1b[2J"


def test_the_table_prints_a_model_s_text_on_its_own_line_escaped() -> None:
    result = JobResult(phase="Failed", reason=Reason.ValidationFailed, message=f"output {FORGED}")
    result._rows = [("output " + FORGED, "cosine 0.5")]
    text = _table(result, "job")
    assert "\x1b" not in text and "\n07:00:00" not in text
    assert "\\n07:00:00 INFO" in text and "\\x1b[2J" in text
    assert all(line.startswith("  ") for line in text.splitlines())


def test_the_report_lists_a_bounded_number_of_outputs() -> None:
    n = MAX_REPORTED_OUTPUTS + 10
    metrics = {f"{'x' * 1000}{i}": OutputMetrics(name=f"o{i}", exact=False) for i in range(n)}
    outcome = ValidationOutcome(
        passed=False, samples=1, device="cpu", provider="torch-cpu", metrics=metrics,
        violations=[f"o{i}: cosine below" for i in range(n)], tolerance=Tolerance(),
        original_bytes=1, quantized_bytes=1,
    )  # fmt: skip
    report = outcome.to_report()
    assert len(report["outputs"]) == MAX_REPORTED_OUTPUTS and report["outputsOmitted"] == 10
    assert len(report["violations"]) == MAX_REPORTED_OUTPUTS and report["violationsOmitted"] == 10
    assert max(len(k) for k in report["outputs"]) <= 256  # cut, each still its own
