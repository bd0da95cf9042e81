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
