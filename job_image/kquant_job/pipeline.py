"""One QuantizationJob, end to end: fetch -> detect -> convert -> validate -> publish.

Everything is staged in a private work directory; the output prefix receives artifacts
first, report.json next and manifest.json last (see :mod:`kquant_job.publish`), and only a
validated set. A failed validation publishes its report.json alone.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kquant_api import (
    Artifact,
    JobResult,
    QuantizationJob,
    Reason,
    ValidationSummary,
)
from kquant_job import logs
from kquant_job.budget import source_budget
from kquant_job.errors import ValidationFailed
from kquant_job.formats import ModelFile, Plan, plan_model
from kquant_job.passes import PassContext, select_pass
from kquant_job.publish import check_output_free, promote, publish, publish_report_only
from kquant_job.report import build_manifest, build_report, now
from kquant_job.storage import Storage, join, open_storage

PRECISION_SUFFIX = {"fp16": "_fp16", "bf16": "_bf16", "int8": "_int8"}


@dataclass
class ConvertedModel:
    """One converted model: where it came from and went, and what the pass and validation said."""

    source: ModelFile
    out_rel: str
    out_files: list[str]
    original_bytes: int
    quantized_bytes: int
    pass_name: str
    details: dict[str, Any]
    validator: Any = None  # kquant_job.validate.validators.Validator, when validation is on
    validation: Any = None  # the validator's outcome, once validated


@dataclass
class _Run:
    job: QuantizationJob
    work: Path
    timings: dict[str, float] = field(default_factory=dict)
    stores: dict[str, Storage] = field(default_factory=dict)

    def store(self, uri: str) -> Storage:
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        if scheme not in self.stores:
            self.stores[scheme] = open_storage(uri, self.job.spec.storage)
        return self.stores[scheme]


def as_prefix(uri: str) -> str:
    """The URI as a prefix (directory): with exactly one trailing '/'."""
    return uri.rstrip("/") + "/"


def output_name(rel: str, precision: str, single_file: bool) -> str:
    """Output path of a converted model: ``silero_vad.onnx`` -> ``silero_vad_fp16.onnx`` for a
    single-file model (the naming kquant's users' services look for); unchanged inside a
    model directory, whose output prefix already says what it holds."""
    if not single_file:
        return rel
    path = PurePosixPath(rel)
    return str(path.with_name(f"{path.stem}{PRECISION_SUFFIX[precision]}{path.suffix}"))


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _bytes(root: Path, rels: list[str]) -> int:
    return sum((root / r).stat().st_size for r in rels)


def _fetch_npz(run: _Run, uri: str | None, name: str, max_bytes: int) -> list[Path]:
    if not uri:
        return []
    local = run.store(uri).download(uri, run.work / name, max_bytes=max_bytes)
    files = [local] if local.is_file() else sorted(local.rglob("*.npz"))
    return [f for f in files if f.suffix == ".npz"]


def _files_for(model: ModelFile, files: list[Path], base: Path, many: bool) -> list[Path]:
    """Sample files for one model: all of them for a single model; for a directory with
    several models, those under a sub-folder named after the model's relative path."""
    if not many:
        return files
    sub = base / model.rel
    return [f for f in files if sub in f.parents]


def run_job(job: QuantizationJob, work: Path) -> JobResult:
    """Run one job in the work directory ``work`` (created if needed) and return its result.

    Raises the worker's KquantError subclasses (InvalidSpec, StorageError, PassError,
    ValidationFailed) with their reasons; the CLI turns them into a failed JobResult.
    """
    spec, run, started = job.spec, _Run(job, work), now()
    work.mkdir(parents=True, exist_ok=True)
    out_prefix = as_prefix(spec.output.uri)
    out_store = run.store(out_prefix)
    logs.info(
        "job",
        name=job.metadata.name,
        source=spec.model.uri,
        output=out_prefix,
        precision=spec.quantization.precision.value,
    )
    check_output_free(out_store, out_prefix, spec.output.overwrite)

    with logs.stage("fetch", run.timings, uri=spec.model.uri):
        budget = source_budget(work)
        local = run.store(spec.model.uri).download(spec.model.uri, work / "source", budget)
        data_files = _fetch_npz(run, spec.validation.dataUri, "validation-data", budget)
        calib = spec.quantization.calibration
        calib_files = _fetch_npz(run, calib.uri if calib else None, "calibration", budget)
    plan = plan_model(
        local, spec.model.format, spec.quantization.include, spec.quantization.exclude
    )
    staged = work / "staged"
    staged.mkdir(exist_ok=True)
    converted = _convert_all(run, plan, local.is_file(), staged, data_files, calib_files)
    for rel in plan.copies:
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(plan.root / rel, staged / rel)
    if not local.is_file():
        logs.info("copied", files=len(plan.copies), bytes=_bytes(staged, plan.copies))

    with logs.stage("validate", run.timings):
        _validate_all(run, plan, converted)
    return _publish(run, plan, converted, staged, out_store, out_prefix, started)


def _convert_all(
    run: _Run, plan: Plan, single: bool, staged: Path, data: list[Path], calib: list[Path]
) -> list[ConvertedModel]:
    from kquant_job.validate.validators import make_validator

    spec = run.job.spec
    cfg, many = spec.quantization, len(plan.models) > 1
    results = []
    with logs.stage("convert", run.timings, models=len(plan.models)):
        for i, model in enumerate(plan.models):
            src = plan.root / model.rel
            pass_ = select_pass(model.format, cfg)
            out_rel = output_name(model.rel, cfg.precision.value, single)
            out_path = staged / out_rel
            out_path.parent.mkdir(parents=True, exist_ok=True)
            validator = None
            if spec.validation.enabled:
                samples = _files_for(model, data, run.work / "validation-data", many)
                validator = make_validator(model.format, src, spec, samples)
            ctx = PassContext(
                work_dir=run.work / "scratch" / str(i),
                probe=validator.probe if validator else None,
                activation_ranges=getattr(validator, "activation_ranges", None),
                calibration_files=_files_for(model, calib, run.work / "calibration", many),
            )
            ctx.work_dir.mkdir(parents=True, exist_ok=True)
            before = _files_under(staged)
            logs.info(
                f"convert {model.rel}",
                model=model.rel,
                **{"pass": pass_.name},
                bytes=src.stat().st_size,
            )
            result = pass_.run(src, cfg, out_path, ctx)
            out_files = sorted(_files_under(staged) - before)
            src_files = [model.rel, *model.external]
            results.append(
                ConvertedModel(
                    source=model,
                    out_rel=out_rel,
                    out_files=out_files,
                    original_bytes=_bytes(plan.root, src_files),
                    quantized_bytes=_bytes(staged, out_files),
                    pass_name=pass_.name,
                    details=result.details,
                )
            )
            results[-1].validator = validator
    return results


def _validate_all(run: _Run, plan: Plan, converted: list[ConvertedModel]) -> None:
    from kquant_job.validate.validators import log_rows

    for model in converted:
        if model.validator is None:
            continue
        outcome = model.validator.validate(run.work / "staged" / model.out_rel)
        model.validation = outcome
        for label, fields in log_rows(outcome):
            logs.info(label, **fields)
        logs.info(
            f"validated {model.source.rel}",
            passed=outcome.passed,
            kind=model.validator.kind,
            device=outcome.device,
            **{
                k: v
                for k, v in outcome.summary().model_dump(exclude_none=True).items()
                if k in ("maxAbsError", "cosineSimilarity")
            },
        )


def _summary(converted: list[ConvertedModel]) -> ValidationSummary | None:
    """One summary over all models: worst error, lowest cosine, summed latency."""
    outcomes = [m.validation for m in converted if m.validation is not None]
    if not outcomes:
        return None
    summaries = [o.summary() for o in outcomes]
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
    kinds = {s.kind for s in summaries}
    return ValidationSummary(
        passed=all(s.passed for s in summaries),
        samples=min(s.samples for s in summaries),
        kind=kinds.pop() if len(kinds) == 1 else "mixed",
        device=summaries[0].device,
        maxAbsError=worst("maxAbsError", max),
        meanAbsError=worst("meanAbsError", max),
        cosineSimilarity=worst("cosineSimilarity", min),
        latencyMs=latency,
    )


def _publish(
    run: _Run,
    plan: Plan,
    converted: list[ConvertedModel],
    staged: Path,
    out_store: Storage,
    out_prefix: str,
    started: str,
) -> JobResult:
    spec, job = run.job.spec, run.job
    summary = _summary(converted)
    passed = summary is None or summary.passed
    original = sum(m.original_bytes for m in converted)
    quantized = sum(m.quantized_bytes for m in converted)
    violations = [
        f"{m.source.rel}: {v}" for m in converted if m.validation for v in m.validation.violations
    ]
    reason = Reason.Validated if passed else Reason.ValidationFailed
    message = (
        f"converted {len(converted)} model(s) to {spec.quantization.precision.value}; "
        f"{original} -> {quantized} bytes"
        if passed
        else "tolerance exceeded: " + "; ".join(violations)
    )
    files = [
        {
            "path": f,
            "action": "converted",
            "bytes": (staged / f).stat().st_size,
            "source": m.source.rel,
        }
        for m in converted
        for f in m.out_files
    ] + [
        {
            "path": c,
            "action": "kept" if c in plan.kept else "copied",
            "bytes": (staged / c).stat().st_size,
        }
        for c in plan.copies
    ]
    models = [
        {
            "path": m.source.rel,
            "output": m.out_rel,
            "format": m.source.format.value,
            "pass": m.pass_name,
            "originalBytes": m.original_bytes,
            "quantizedBytes": m.quantized_bytes,
            "details": m.details,
            "validation": (
                {"kind": m.validator.kind, **m.validation.to_report()}
                if m.validation
                else {"skipped": True}
            ),
        }
        for m in converted
    ]
    sizes = {
        "originalBytes": original,
        "quantizedBytes": quantized,
        "reductionPercent": round(100.0 * (1 - quantized / original), 2) if original else 0,
    }
    outcome = {
        "phase": "Succeeded" if passed else "Failed",
        "reason": reason.value,
        "message": message,
    }
    source = {"uri": spec.model.uri, "files": len(plan.models) + len(plan.copies)}
    providers = next((m.validator.providers for m in converted if m.validator), [])

    # Built once, before publishing: the output and the promotion get the same bytes.
    report = build_report(
        job,
        started=started,
        source=source,
        files=files,
        models=models,
        sizes=sizes,
        timings=dict(run.timings),
        outcome=outcome,
        providers=providers,
    )

    if not passed:
        with logs.stage("publish", run.timings, uri=out_prefix, only="report.json"):
            report_uri = publish_report_only(out_store, out_prefix, report)
        raise ValidationFailed(
            message,
            report_uri=report_uri,
            summary=summary,
            originalBytes=original,
            quantizedBytes=quantized,
        )

    validation = (
        summary.model_dump(mode="json", exclude_none=True) if summary else {"skipped": True}
    )
    manifest = build_manifest(job, validation=validation)
    rels = sorted(_files_under(staged))
    with logs.stage("publish", run.timings, uri=out_prefix, files=len(rels)):
        published = publish(
            out_store, out_prefix, staged, rels, report, manifest, overwrite=spec.output.overwrite
        )
    promoted = None
    if spec.promotion:
        promo_prefix = as_prefix(spec.promotion.uri)
        with logs.stage("promote", run.timings, uri=promo_prefix):
            promote(run.store(promo_prefix), promo_prefix, staged, rels, report, manifest)
        promoted = promo_prefix
    converted_uris = {join(out_prefix, f) for m in converted for f in m.out_files}
    artifacts = sorted(published.artifacts, key=lambda a: (a.uri not in converted_uris, a.uri))
    return JobResult(
        phase="Succeeded",
        reason=Reason.Validated,
        message=message,
        precision=spec.quantization.precision.value,
        originalBytes=original,
        quantizedBytes=quantized,
        validation=summary,
        artifacts=[Artifact(uri=a.uri, sha256=a.sha256, bytes=a.bytes) for a in artifacts],
        reportUri=published.report_uri,
        manifestUri=published.manifest_uri,
        promotedUri=promoted,
    )
