"""The worker's compact result: exit codes per error class and the 4 KiB limit."""

from __future__ import annotations

import json

from kquant_api import (
    NON_RETRIABLE_EXIT_CODES,
    REASON_EXIT_CODE,
    Artifact,
    ExitCode,
    JobResult,
    Reason,
)
from kquant_api.result import MAX_RESULT_BYTES


def test_every_reason_has_an_exit_code_and_only_outages_retry():
    assert set(REASON_EXIT_CODE) == set(Reason)
    assert ExitCode.STORAGE_UNAVAILABLE not in NON_RETRIABLE_EXIT_CODES
    for reason in (
        Reason.InvalidSpec,
        Reason.SourceNotFound,
        Reason.CorruptModel,
        Reason.ValidationFailed,
        Reason.AccessDenied,
    ):
        assert int(REASON_EXIT_CODE[reason]) in NON_RETRIABLE_EXIT_CODES
    classes = {
        REASON_EXIT_CODE[r]
        for r in (
            Reason.InvalidSpec,
            Reason.SourceNotFound,
            Reason.ConversionFailed,
            Reason.ValidationFailed,
        )
    }
    assert len(classes) == 4


def test_result_stays_under_the_termination_message_limit():
    artifacts = [
        Artifact(uri=f"s3://bucket/a/very/long/prefix/file-{i:04d}.bin", sha256="ab" * 32, bytes=i)
        for i in range(200)
    ]
    result = JobResult(
        phase="Succeeded", reason=Reason.Validated, message="é" * 5000, artifacts=artifacts
    )
    text = result.to_json()
    assert len(text.encode()) <= MAX_RESULT_BYTES
    data = json.loads(text)
    assert data["artifactsTruncated"] == 200 - len(data["artifacts"])
    assert data["reason"] == "Validated"
    assert JobResult.model_validate(data).phase == "Succeeded"


def test_small_result_is_kept_whole():
    result = JobResult(phase="Failed", reason=Reason.SourceNotFound, message="no such object")
    data = json.loads(result.to_json())
    assert data == {
        "phase": "Failed",
        "reason": "SourceNotFound",
        "message": "no such object",
        "artifacts": [],
        "artifactsTruncated": 0,
    }
    assert result.exit_code == int(ExitCode.STORAGE)


def test_notes_go_first_when_the_result_is_too_long():
    from kquant_api import JobResult, Reason

    result = JobResult(phase="Succeeded", reason=Reason.Validated, notes=["n" * 3000, "m" * 3000])
    data = json.loads(result.to_json())
    assert len(result.to_json()) <= 4096
    assert data["notes"] == ["n" * 3000]  # trimmed from the end, before anything else
    assert "notes" not in json.loads(JobResult(phase="Failed", reason=Reason.Validated).to_json())


def test_thousands_of_artifacts_are_cut_without_serializing_each(monkeypatch):
    """A folder of 30 000 side files: the result dropped one artifact at a time and
    serialized itself after each (30 000 times, minutes after publishing; trial)."""
    import kquant_api.result as result_module

    calls = []
    real = result_module._dumps
    monkeypatch.setattr(result_module, "_dumps", lambda d: calls.append(1) or real(d))
    artifacts = [Artifact(uri=f"file:///o/f{i}", sha256="ab" * 32, bytes=1) for i in range(30_000)]
    data = json.loads(JobResult(phase="Succeeded", reason=Reason.Validated, message="ok",
                                artifacts=artifacts).to_json())  # fmt: skip
    assert data["artifactsTruncated"] == 30_000 - len(data["artifacts"]) > 0
    assert len(calls) <= result_module.MAX_ARTIFACTS_TRIED + 3


def _variants_result(prefix: str, names: int = 8) -> JobResult:
    from kquant_api.result import LatencyMs, ValidationSummary, VariantResult

    variants = [
        VariantResult(name=f"variant-{i:02d}-" + "x" * 20, precision="fp16", passed=True,
                      reason="Validated", quantizedBytes=1_000_000 + i, cosineSimilarity=0.9999,
                      meanAbsError=1e-3, latencyMs=LatencyMs(original=1.5, quantized=1.4))
        for i in range(names)
    ]  # fmt: skip
    return JobResult(
        phase="Succeeded", reason=Reason.Validated, message="variant chosen " * 20,
        validation=ValidationSummary(passed=True, samples=16, device="cpu", maxAbsError=0.01,
                                     cosineSimilarity=0.9999, inputs="x [1, 576] " * 30),
        reportUri=prefix + "report.json", manifestUri=prefix + "manifest.json",
        promotedUri=prefix.replace("out", "prod"), chosen=variants[3].name, variants=variants,
    )  # fmt: skip


def test_a_variants_result_with_long_prefixes_stays_whole_json_under_the_limit():
    """Variants trial: 8 variants with long names and ~670-character prefixes made a
    5,220-byte result; the kubelet cut it, and the operator read NoResult for a model it had
    promoted. The figures go first, then other variants; the verdict and URIs stay."""
    prefix = "s3://bucket/" + "/".join(["segment-" + "s" * 40] * 14) + "/out/"
    result = _variants_result(prefix)
    text = result.to_json()
    assert len(text.encode()) <= MAX_RESULT_BYTES
    back = JobResult.model_validate_json(text)  # the operator's parse
    assert (back.phase, back.reason, back.chosen) == ("Succeeded", Reason.Validated,
                                                      result.chosen)  # fmt: skip
    assert back.promotedUri == result.promotedUri and back.manifestUri == result.manifestUri
    assert result.chosen in [v.name for v in back.variants]


def test_a_result_that_cannot_fit_keeps_its_verdict():
    prefix = "s3://bucket/" + "p" * 3000 + "/out/"
    text = _variants_result(prefix, names=20).to_json()
    assert len(text.encode()) <= MAX_RESULT_BYTES
    back = JobResult.model_validate_json(text)
    assert (back.phase, back.reason) == ("Succeeded", Reason.Validated)
