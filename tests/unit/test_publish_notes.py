"""What a result says when publishing succeeded but its fixed names did not follow
(kquant_job.pipeline.note_unfinished_copies)."""

from __future__ import annotations

from kquant_api import JobResult, Reason
from kquant_job.pipeline import note_unfinished_copies
from kquant_job.sets.mirrors import MirrorOutcome
from kquant_job.sets.publish import PublishedSet


def _published(set_id: str, **kw: object) -> PublishedSet:
    return PublishedSet(set_id, [], f"s3://b/p/.kquant/sets/{set_id}/report.json",
                        "s3://b/p/manifest.json", **kw)  # type: ignore[arg-type]  # fmt: skip


def test_unfinished_copies_and_foreign_names_are_noted_with_the_way_out() -> None:
    result = JobResult(phase="Succeeded", reason=Reason.Validated)
    behind = _published("S1", copies_error="cannot copy: unreachable")
    left = _published("S2", mirrors=MirrorOutcome(set_id="S2", foreign=["model.onnx"]))
    note_unfinished_copies(result, (behind, "s3://b/out/"), (left, "s3://b/prod/"), (None, None))
    assert len(result.notes) == 2
    assert result.notes[0].startswith("s3://b/out/: manifest.json names the new set")
    assert "kquant-job rollback s3://b/out/ --to S1" in result.notes[0]
    assert result.notes[1].startswith("s3://b/prod/: 1 fixed name(s) of the set hold files")
    assert "model.onnx" in result.notes[1]
    clean = JobResult(phase="Succeeded", reason=Reason.Validated)
    note_unfinished_copies(clean, (_published("S3"), "s3://b/out/"))
    assert clean.notes == []
