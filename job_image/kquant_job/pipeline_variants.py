"""The run of a spec with ``spec.variants``: every variant converted and validated in a
sandboxed stage of its own, on the same fetched model and validation samples; every passing
one published under its own name in one set; the best by ``spec.selection.objective``
chosen and promoted. A variant that fails (conversion, tolerance, NoGain) is recorded in the
comparison; the job fails only when none passes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from kquant_api import (
    REASON_EXIT_CODE,
    ExitCode,
    JobResult,
    Objective,
    QuantizationConfig,
    QuantizationJob,
    Reason,
    VariantResult,
)
from kquant_job import logs
from kquant_job.budget import room
from kquant_job.errors import PassError, ValidationFailed
from kquant_job.judge import assess, providers_of, source_entry, success_result
from kquant_job.pipeline import JobRun, fetch_npz, note_unfinished_copies, promote, staged_files
from kquant_job.report import build_report, manifest_fields
from kquant_job.sandbox.runner import run_stage
from kquant_job.sets import Target
from kquant_job.stage import StageInput
from kquant_job.variants import (
    VariantOutcome,
    choose,
    comparison_rows,
    variant_jobs,
    why_chosen,
)

LOG = logging.getLogger("kquant")
MESSAGE_CHARS = 300  # of a failed variant's message in the result (the report has it all)


def _variant_io(
    run: JobRun, io: StageInput, label: str, config: QuantizationConfig, shared: Path
) -> StageInput:
    """The variant's own sandbox folders, its own calibration samples fetched, and the
    folder of the shared reference pass (``shared``: in the first variant's sandbox, which
    writes it; the others read it, as the whole work directory is readable to a stage)."""
    box = run.work / f"sandbox-{label}"
    folder = f"calibration-{label}"
    files = []
    if config.calibration:
        where = f"spec.variants[{label}].calibration.uri"
        files = fetch_npz(run, config.calibration.uri, folder, room(run.work), where)
    return dataclasses.replace(
        io,
        calib=files,
        calib_dir=run.work / folder,
        staged=box / "staged",
        scratch=box / "scratch",
        shared_reference=shared,
    )


def _run_one(
    run: JobRun, io: StageInput, label: str, vjob: QuantizationJob, shared: Path
) -> VariantOutcome:
    """Convert, validate and judge one variant; a PassError or ValidationFailed becomes its
    failed entry (anything else ends the job)."""
    config = vjob.spec.quantization
    assert config is not None
    precision = config.precision.value
    vio = _variant_io(run, io, label, config, shared)
    logs.info(f"variant {label}", precision=precision)
    try:
        done = run_stage(vjob, vio, run.work, run.limits)
    except (PassError, ValidationFailed) as exc:
        LOG.warning("variant %s failed: %s: %s", label, exc.reason.value, exc)
        entry = VariantResult(
            name=label,
            precision=precision,
            passed=False,
            reason=exc.reason.value,
            message=str(exc)[:MESSAGE_CHARS],
        )
        return VariantOutcome(entry, error={"message": str(exc), **_jsonable(exc.detail)})
    stage = done["stage"]
    run.sandbox = done["sandbox"]
    run.timings.update({f"{label}.{k}": v for k, v in stage.timings.items()})
    judged = assess(vjob, stage, vio.staged)
    summary = judged.summary
    entry = VariantResult(
        name=label,
        precision=precision,
        passed=judged.passed,
        reason=judged.reason.value,
        message=None if judged.passed else judged.message[:MESSAGE_CHARS],
        quantizedBytes=judged.quantized,
        latencyMs=summary.latencyMs if summary else None,
        cosineSimilarity=summary.cosineSimilarity if summary else None,
        meanAbsError=summary.meanAbsError if summary else None,
    )
    return VariantOutcome(entry, judged=judged, staged=vio.staged,
                          rels=staged_files(vio.staged))  # fmt: skip


def _jsonable(detail: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in detail.items() if isinstance(v, (str, int, float, bool, list, dict))}


def _assemble(outcomes: list[VariantOutcome], combined: Path, single: bool) -> dict[str, list[str]]:
    """Move every passing variant's staged files into ``combined`` (a single model's files
    keep their names, which differ by suffix; a folder's go under ``<name>/``); returns
    ``{name: its paths in combined}``. Renames keep each file's one link."""
    placed: dict[str, list[str]] = {}
    for o in outcomes:
        if not o.entry.passed or o.staged is None:
            continue
        prefix = "" if single else f"{o.entry.name}/"
        placed[o.entry.name] = []
        for rel in o.rels:
            dst = combined / (prefix + rel)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(o.staged / rel, dst)
            placed[o.entry.name].append(prefix + rel)
    return placed


def _failure(outcomes: list[VariantOutcome]) -> tuple[Reason, str]:
    """The job's reason when no variant passed: ValidationFailed if any variant missed the
    tolerance, else NoGain if any paid nothing, else the first variant's reason."""
    reasons = [Reason(o.entry.reason) for o in outcomes]
    reason = next((r for r in (Reason.ValidationFailed, Reason.NoGain) if r in reasons), reasons[0])
    each = "; ".join(
        f"{o.entry.name}: {o.entry.reason} ({(o.entry.message or '')[:150]})" for o in outcomes
    )
    return reason, f"no variant passed: {each}"


def _entries(outcomes: list[VariantOutcome], chosen: VariantOutcome | None) -> list[dict]:
    """report.json's ``variants``: each entry, its tolerance, notes and files (or error)."""
    out = []
    for o in outcomes:
        entry: dict[str, Any] = o.entry.model_dump(mode="json", exclude_none=True)
        entry["chosen"] = o is chosen
        if o.judged is not None:
            spec = o.judged.job.spec
            entry["tolerance"] = spec.tolerance.model_dump(mode="json", exclude_none=True)
            entry["message"] = o.judged.message
            entry["notes"] = o.judged.notes
            entry["sizes"] = o.judged.sizes
        if o.error:
            entry["error"] = o.error
        out.append(entry)
    return out


def run_variants(
    run: JobRun, io: StageInput, out: Target, promo: Target | None, started: str
) -> JobResult:
    """Run every variant of ``run.job`` and publish as the module docstring says. Raises
    ValidationFailed (reason ValidationFailed or NoGain) or PassError (the first variant's
    reason) when none passed, after writing the failure's report.json with the comparison;
    InvalidSpec and StorageErrors end the job at once."""
    job = run.job
    objective = job.spec.selection.objective if job.spec.selection else Objective.smallest
    variants = variant_jobs(job)
    shared = run.work / f"sandbox-{variants[0][0]}" / "reference"
    outcomes = [_run_one(run, io, label, vjob, shared) for label, vjob in variants]
    original = next((o.judged.original for o in outcomes if o.judged), 0)
    chosen = choose(outcomes, objective)
    why = why_chosen(chosen, objective, original) if chosen else ""
    single = io.source.is_file()
    placed = _assemble(outcomes, run.work / "variants", single)
    rows = comparison_rows(outcomes, chosen, original, why)
    if chosen is not None and chosen.judged is not None:
        rows += chosen.judged.rows
        reason, message = chosen.judged.reason, f"variant {chosen.entry.name} chosen ({why}); "
        message += f"{len(placed)} of {len(outcomes)} variant(s) passed and are published"
    else:
        reason, message = _failure(outcomes)
    report = _report(run, outcomes, chosen, single, started, reason, message)
    report["selection"] = {"objective": objective.value,
                           "chosen": chosen.entry.name if chosen else None, "why": why}  # fmt: skip
    entries = [o.entry for o in outcomes]
    if chosen is None or chosen.judged is None:
        with logs.stage("publish", run.timings, uri=out.prefix, only="report.json"):
            report_uri = out.publish_failure(report)
        cls = ValidationFailed if REASON_EXIT_CODE[reason] is ExitCode.VALIDATION else PassError
        raise cls(message, reason=reason, report_uri=report_uri, rows=rows,
                  originalBytes=original or None, variants=entries)  # fmt: skip
    return _publish_variants(run, out, promo, report, placed, chosen, entries, rows, message)


def _report(
    run: JobRun,
    outcomes: list[VariantOutcome],
    chosen: VariantOutcome | None,
    single: bool,
    started: str,
    reason: Reason,
    message: str,
) -> dict[str, Any]:
    """report.json of a variants run: every passing variant's files (paths in the set) and
    every converted variant's models, each marked with its variant; the chosen one's sizes
    and notes; ``tolerance`` and ``variants`` per variant."""
    job = run.job
    files = [
        {
            **f,
            "variant": o.entry.name,
            "path": f["path"] if single else f"{o.entry.name}/{f['path']}",
        }
        for o in outcomes
        if o.entry.passed and o.judged
        for f in o.judged.files
    ]
    models = [{**m, "variant": o.entry.name} for o in outcomes if o.judged for m in o.judged.models]
    first = next((o.judged.stage for o in outcomes if o.judged), None)
    picked = chosen.judged if chosen else None
    original = next((o.judged.original for o in outcomes if o.judged), 0)
    report = build_report(
        job,
        started=started,
        source=source_entry(job, first) if first else {"uri": job.spec.model.uri},
        files=files,
        models=models,
        sizes=picked.sizes if picked else {"originalBytes": original},
        timings=dict(run.timings),
        outcome={
            "phase": "Succeeded" if picked else "Failed",
            "reason": reason.value,
            "message": message,
            "notes": picked.notes if picked else [],
        },
        providers=providers_of(first) if first else [],
        sandbox=run.sandbox,
    )
    entries = _entries(outcomes, chosen)
    report["tolerance"] = {e["name"]: e.get("tolerance") for e in entries}
    report["variants"] = entries
    return report


def _publish_variants(
    run: JobRun,
    out: Target,
    promo: Target | None,
    report: dict[str, Any],
    placed: dict[str, list[str]],
    chosen: VariantOutcome,
    entries: list[VariantResult],
    rows: list[tuple[str, str]],
    message: str,
) -> JobResult:
    """Publish every passing variant's files as one set; promote the chosen one's."""
    judged = chosen.judged
    assert judged is not None
    combined = run.work / "variants"
    rels = sorted(r for paths in placed.values() for r in paths)
    summary = judged.summary
    validation = (
        summary.model_dump(mode="json", exclude_none=True) if summary else {"skipped": True}
    )
    fields = manifest_fields(judged.job, validation=validation)
    fields["variant"] = chosen.entry.name
    fields["variants"] = {name: paths for name, paths in placed.items()}
    for note in judged.notes:
        LOG.warning(note)
    with logs.stage("publish", run.timings, uri=out.prefix, files=len(rels)):
        published = out.publish(combined, rels, report, fields)
    promoted, promoted_set = None, None
    if promo is not None:
        # the promotion holds the chosen variant only, and its manifest and report's files
        # say so (the report still compares every variant: why this one was chosen)
        name = chosen.entry.name
        own = {**fields, "variants": {name: placed[name]}}
        files = [f for f in report.get("files", []) if f.get("variant") == name]
        with logs.stage("promote", run.timings, uri=promo.prefix, variant=name):
            promoted_set = promote(
                promo, published, combined, sorted(placed[name]), {**report, "files": files}, own
            )
        promoted = promo.prefix
    first = set(placed[chosen.entry.name])
    set_folder = published.report_uri.rsplit("/", 1)[0]
    artifacts = sorted(
        published.artifacts,
        key=lambda a: (a.uri.removeprefix(set_folder + "/") not in first, a.uri),
    )
    result = success_result(
        judged, message, artifacts, published.report_uri, published.manifest_uri, promoted,
        chosen=chosen.entry.name, variants=entries,
    )  # fmt: skip
    note_unfinished_copies(result, (published, out.prefix), (promoted_set, promoted))
    result._rows = rows
    return result
