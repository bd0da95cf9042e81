"""Judging one conversion's staged result before anything is published: the validation
summary over its models, the verdict (Validated, ValidationFailed, NoGain; Converted when
validation is off) and what report.json, the result and the table take from it. Shared by a
single conversion's run (:mod:`kquant_job.pipeline`) and each variant's
(:mod:`kquant_job.pipeline_variants`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kquant_api import Artifact, JobResult, QuantizationJob, Reason, ValidationSummary
from kquant_job.gain import gain_shortfalls, latency_ratio
from kquant_job.stage import ModelOutcome, StageOutcome
from kquant_job.table import result_notes, table_rows

MAX_INPUTS_TEXT = 400  # characters of the chosen inputs in the result (under its 4 KiB)


def _summary(converted: list[ModelOutcome]) -> ValidationSummary | None:
    """One summary over all models: worst error, lowest cosine, summed latency."""
    summaries = [
        ValidationSummary.model_validate(m.validation["summary"])
        for m in converted
        if m.validation is not None
    ]
    if not summaries:
        return None
    if len(summaries) == 1:
        return summaries[0]

    def worst(attr: str, fn: Any) -> float | None:
        values = [getattr(s, attr) for s in summaries if getattr(s, attr) is not None]
        return fn(values) if values else None

    latency = None
    if all(s.latencyMs for s in summaries):
        latency = {
            "original": sum(s.latencyMs.original for s in summaries),  # type: ignore[union-attr]
            "quantized": sum(s.latencyMs.quantized for s in summaries),  # type: ignore[union-attr]
        }
        runs = [s.latencyMs.runs for s in summaries if s.latencyMs and s.latencyMs.runs]
        if runs:
            latency["runs"] = min(runs)
        latency.update(_interleaved([s.latencyMs for s in summaries]))  # type: ignore[misc]
    kinds = {s.kind for s in summaries}
    # Samples are model runs; a tensor comparison counts tensors: a mixed folder said
    # "outputs on 7 samples" (7 tensors) where its ONNX model ran 16.
    runs = [s.samples for s in summaries if s.kind != "tensors"] or [s.samples for s in summaries]
    inputs = "; ".join(s.inputs for s in summaries if s.inputs)[:MAX_INPUTS_TEXT] or None
    return ValidationSummary(
        passed=all(s.passed for s in summaries),
        samples=min(runs),
        kind=kinds.pop() if len(kinds) == 1 else "mixed",
        device=summaries[0].device,
        maxAbsError=worst("maxAbsError", max),
        meanAbsError=worst("meanAbsError", max),
        cosineSimilarity=worst("cosineSimilarity", min),
        latencyMs=latency,
        inputs=inputs,
    )


def _interleaved(parts: list[Any]) -> dict[str, Any]:
    """The interleaved ratio of several models' latencies summed (``LatencyMs`` each), when
    any was confirmed in blocks: each model's ratio (interleaved, else of its medians)
    weighted by its original's median, as the sums' ratio weighs them. Empty otherwise."""
    confirmed = [p for p in parts if p.interleavedRatio is not None]
    total = sum(p.original for p in parts)
    if not confirmed or total <= 0:
        return {}
    weighted = sum(p.original * latency_ratio(p.original, p.quantized, p.interleavedRatio)
                   for p in parts)  # fmt: skip
    return {
        "interleavedRatio": weighted / total,
        "interleavedRuns": min(p.interleavedRuns or 0 for p in confirmed),
    }


@dataclass
class Assessed:
    """What one conversion's run came to, before anything is published: the verdict
    (``passed``, ``reason``, ``message``), the sizes in bytes, the validation summary, and
    what report.json, the result and the table take from it."""

    job: QuantizationJob
    stage: StageOutcome
    summary: ValidationSummary | None
    passed: bool
    reason: Reason
    message: str
    original: int
    quantized: int
    files: list[dict[str, Any]]
    models: list[dict[str, Any]]
    notes: list[str]
    rows: list[tuple[str, str]]

    @property
    def sizes(self) -> dict[str, Any]:
        """Original and converted bytes and the reduction (percent)."""
        o, q = self.original, self.quantized
        return {
            "originalBytes": o,
            "quantizedBytes": q,
            "reductionPercent": round(100.0 * (1 - q / o), 2) if o else 0,
        }

    @property
    def outcome(self) -> dict[str, Any]:
        """report.json's outcome."""
        return {
            "phase": "Succeeded" if self.passed else "Failed",
            "reason": self.reason.value,
            "message": self.message,
            "notes": self.notes,
        }


def assess(job: QuantizationJob, stage: StageOutcome, staged: Path) -> Assessed:
    """Judge one conversion's staged result (``job`` has one ``spec.quantization``): within
    tolerance (Validated, ValidationFailed; Converted when validation is off), and worth
    publishing (:func:`kquant_job.gain.gain_shortfalls`: NoGain). Reads only file sizes."""
    spec, converted = job.spec, stage.models
    config = spec.quantization
    assert config is not None
    summary = _summary(converted)
    passed = summary is None or summary.passed
    original = sum(m.original_bytes for m in converted)
    quantized = sum(m.quantized_bytes for m in converted)
    violations = [
        f"{m.source}: {v}" for m in converted if m.validation for v in m.validation["violations"]
    ]
    if summary is None:  # nothing was compared: spec.validation.enabled is false
        reason = Reason.Converted
    else:
        reason = Reason.Validated if passed else Reason.ValidationFailed
    message = (
        f"converted {len(converted)} model(s) to {config.precision.value}; "
        f"{original} -> {quantized} bytes"
        if passed
        else "tolerance exceeded: " + "; ".join(violations)
    )
    measured = summary.latencyMs if summary else None
    runs = measured.runs if measured and measured.runs else spec.validation.latencyRuns
    conv_integer = any("ConvInteger" in (m.details.get("quantizedOps") or {}) for m in converted)
    shortfalls = (
        gain_shortfalls(config, original, quantized, summary, runs, conv_integer) if passed else []
    )
    if shortfalls:
        passed, reason = False, Reason.NoGain
        message = (
            f"the {config.precision.value} result is within tolerance but pays "
            f"nothing: {'; '.join(shortfalls)}; nothing published (quantization.requireGain: "
            "false publishes it anyway)"
        )
    if reason is Reason.Converted:
        message += "; not validated (spec.validation.enabled: false)"
    files = [
        {
            "path": f,
            "action": "converted",
            "bytes": (staged / f).stat().st_size,
            "source": m.source,
        }
        for m in converted
        for f in m.out_files
    ] + [
        {
            "path": c,
            "action": "kept" if c in stage.kept else "copied",
            "bytes": (staged / c).stat().st_size,
            **({"why": stage.kept[c]} if c in stage.kept else {}),
        }
        for c in stage.copies
    ]
    models = [
        {
            "path": m.source,
            "output": m.out_rel,
            "format": m.format,
            "pass": m.pass_name,
            "originalBytes": m.original_bytes,
            "quantizedBytes": m.quantized_bytes,
            "details": m.details,
            "validation": (
                {"kind": m.validation["kind"], **m.validation["report"]}
                if m.validation
                else {"skipped": True}
            ),
        }
        for m in converted
    ]
    notes = result_notes(converted, summary, spec.conversions[0].precision.value)
    rows = table_rows(converted, spec.tolerance, spec.validation.tolerance is not None)
    return Assessed(job, stage, summary, passed, reason, message, original, quantized,
                    files, models, notes, rows)  # fmt: skip


def success_result(
    judged: Assessed,
    message: str,
    artifacts: list[Any],
    report_uri: str,
    manifest_uri: str,
    promoted: str | None,
    **extra: Any,
) -> JobResult:
    """The compact result of a published conversion: ``judged``'s verdict, sizes,
    validation and notes, the published ``artifacts`` (sets.PublishedArtifact, in order),
    where the report and manifest went, the promotion prefix, and ``extra`` fields
    (``chosen``, ``variants``)."""
    config = judged.job.spec.quantization
    assert config is not None
    return JobResult(
        phase="Succeeded",
        reason=judged.reason,
        message=message,
        precision=config.precision.value,
        originalBytes=judged.original,
        quantizedBytes=judged.quantized,
        validation=judged.summary,
        artifacts=[Artifact(uri=a.uri, sha256=a.sha256, bytes=a.bytes) for a in artifacts],
        reportUri=report_uri,
        manifestUri=manifest_uri,
        promotedUri=promoted,
        notes=judged.notes,
        **extra,
    )


def source_entry(job: QuantizationJob, stage: StageOutcome) -> dict[str, Any]:
    """report.json's ``source``: the model URI, its file count, and the files left alone
    beside the originals."""
    source: dict[str, Any] = {
        "uri": job.spec.model.uri,
        "files": len(stage.models) + len(stage.copies),
    }
    if stage.left:
        source["leftAlone"] = stage.left  # beside the originals: not part of the set
    return source


def providers_of(stage: StageOutcome) -> list[str]:
    """The execution providers validation used (the first model's that has any)."""
    return next((m.providers for m in stage.models if m.providers), [])
