"""One QuantizationJob, end to end: fetch -> detect -> convert -> validate -> publish.

Everything is staged in a private work directory. Before any work the output and promotion
prefixes are read (:meth:`kquant_job.sets.Target.preflight`): a prefix this run may not
write ends the job at once. Only a validated set is published, as a new immutable set folder
committed by one conditional manifest write (:mod:`kquant_job.sets`). Any failure after the
preflight writes its report.json into a set folder of its own under the output, touching
nothing else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kquant_api import (
    JobResult,
    QuantizationJob,
    QuantizationJobSpec,
    Reason,
)
from kquant_api.uris import find_overlaps, location, model_folder
from kquant_job import logs
from kquant_job.beside import home_for, looks_converted
from kquant_job.budget import check_budget, room, work_factor
from kquant_job.companions import companion_bytes, companion_names, fetch_companions
from kquant_job.errors import InvalidSpec, KquantError, StorageError, ValidationFailed
from kquant_job.judge import assess, providers_of, source_entry, success_result
from kquant_job.logs import printable
from kquant_job.report import build_report, failure_report, manifest_fields, now
from kquant_job.sandbox.accept import staged_files
from kquant_job.sandbox.limits import Limits
from kquant_job.sandbox.runner import run_plan, run_stage
from kquant_job.sets import Target, Writer, as_prefix
from kquant_job.stage import StageInput, StageOutcome
from kquant_job.storage import Storage, is_prefix, join, open_storage
from kquant_job.storage.file import to_path

LOG = logging.getLogger("kquant")


@dataclass
class JobRun:
    """One run of a job: the job, its work directory, the sandbox limits, stage timings
    (ms), the storages opened (by scheme) and what the sandbox enforced."""

    job: QuantizationJob
    work: Path
    limits: Limits
    timings: dict[str, float] = field(default_factory=dict)
    stores: dict[str, Storage] = field(default_factory=dict)
    sandbox: dict[str, Any] = field(default_factory=dict)

    def store(self, uri: str) -> Storage:
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        if scheme not in self.stores:
            self.stores[scheme] = open_storage(uri, self.job.spec.storage)
        return self.stores[scheme]


def _stored_bytes(run: JobRun, uri: str, skip: Callable[[str], bool] | None = None) -> int:
    """Bytes the objects at ``uri`` (an object, or every object of a prefix but those
    ``skip`` names) will take on disk once fetched (:func:`on_disk`), without fetching; 0
    when nothing is there (the download then says SourceNotFound)."""
    store = run.store(uri)
    if is_prefix(uri):
        return sum(on_disk(o.size) for o in store.list(uri) if not (skip and skip(o.key)))
    info = store.stat(uri)
    return on_disk(info.size) if info else 0


def on_disk(size: int, block: int = 4096) -> int:
    """What a file of ``size`` bytes takes on disk: whole blocks, one at least (3000 objects
    of one byte take 12 MB, not 3 KB: a red-team trial filled the volume so)."""
    return max(1, -(-size // block)) * block


def _in_place(store: Storage, uri: str) -> Path | None:
    """The checked local path the source at ``uri`` will be read from where it lies (a local
    file or folder), or None when it is copied into the work directory. A source that fails
    the check counts as copied: the fetch then checks it again and reports why."""
    try:
        return store.read_in_place(uri)
    except StorageError:
        return None


def fetch_npz(
    run: JobRun, uri: str | None, name: str, max_bytes: int, field: str = "spec.validation.dataUri"
) -> list[Path]:
    """Fetch the ``.npz`` samples at ``uri`` (a file or a prefix) into ``run.work / name``;
    the local files, sorted ([] when ``uri`` is None). Raises InvalidSpec naming ``field``
    when ``uri`` holds no ``.npz`` file (a folder of WAVs was validated on kquant's own clip
    instead, silently), and the download's StorageErrors (SourceNotFound naming ``field``)."""
    if not uri:
        return []
    try:
        local = run.store(uri).download(uri, run.work / name, max_bytes=max_bytes)
    except StorageError as exc:
        if exc.reason is Reason.SourceNotFound and field not in str(exc):
            raise StorageError(f"{field}: {exc}", reason=exc.reason) from None
        raise
    found = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    files = [f for f in found if f.suffix == ".npz"]
    if not files:
        others = ", ".join(printable(f.name) for f in found[:3]) or "nothing"
        raise InvalidSpec(
            f"{field}: {uri} holds no .npz file (found {others}); samples are .npz files "
            "whose arrays are named after the model's inputs: `kquant-job frames` makes "
            "them from WAV files"
        )
    return files


def check_resolved_overlaps(spec: QuantizationJobSpec) -> None:
    """The spec's overlap rule (:mod:`kquant_api.uris`) on local paths as this process sees
    them: relative paths joined to the working directory, symlinks resolved. Raises
    InvalidSpec naming the fields."""

    def resolved(uri: str) -> str:
        if uri.startswith("s3://"):
            return uri
        return "file://" + os.path.realpath(to_path(uri))

    writes = {k: resolved(v) for k, v in spec.write_uris().items()}
    reads = {k: resolved(v) for k, v in spec.read_uris().items()}
    allowed = set()
    if spec.output.besideOriginals:  # the output is the model's own folder, by design
        folder = resolved(model_folder(spec.model.uri))
        if location(writes["spec.output.uri"]) != location(folder):
            raise InvalidSpec(
                f"spec.output.uri: with besideOriginals the output is the model's own folder "
                f"({folder}), not {writes['spec.output.uri']}"
            )
        allowed.add(("spec.output.uri", "spec.model.uri"))
    overlaps = find_overlaps(writes, reads, allowed)
    if overlaps:
        raise InvalidSpec("; ".join(overlaps))


def check_local_targets(spec: QuantizationJobSpec) -> None:
    """The local (``file://``) output and promotion folders can be made and written: their
    nearest existing folder is a folder (not a file), writable, on a writable file system.
    Read-only (the dry run's preflight too): a run found out only when publishing, after
    converting and validating, and named spec.model.uri. Raises InvalidSpec for a folder
    under a file, StorageError(AccessDenied) for one kquant may not write."""
    for field_name, uri in spec.write_uris().items():
        if uri.startswith("s3://"):
            continue
        path = Path(os.path.abspath(to_path(uri)))
        nearest = next(p for p in (path, *path.parents) if os.path.lexists(p))
        if not nearest.is_dir():
            raise InvalidSpec(
                f"{field_name}: {uri} lies under {nearest}, which is not a folder: kquant "
                "cannot make a folder there"
            )
        readonly = bool(os.statvfs(nearest).f_flag & os.ST_RDONLY)
        if readonly or not os.access(nearest, os.W_OK | os.X_OK):
            why = "a read-only file system" if readonly else "no permission to write"
            raise StorageError(
                f"{field_name}: {uri} cannot be written ({nearest}: {why})",
                reason=Reason.AccessDenied,
            )


def open_targets(run: JobRun) -> tuple[Target, Target | None]:
    """Check the spec's overlaps on resolved paths, and read the output and promotion
    prefixes (:meth:`Target.preflight`, read-only): the targets to publish to. Raises
    InvalidSpec and the preflight's StorageErrors (OutputExists, Superseded,
    ForeignObject...)."""
    spec = run.job.spec
    out_prefix = as_prefix(spec.output.uri)
    beside = spec.output.besideOriginals
    logs.info(
        "job",
        name=run.job.metadata.name,
        source=spec.model.uri,
        output=out_prefix,
        conversions=", ".join(c.label for c in spec.conversions),
    )
    check_resolved_overlaps(spec)
    check_local_targets(spec)
    writer = Writer.of(run.job)
    out = Target(
        run.store(out_prefix),
        out_prefix,
        writer,
        replace=spec.output.overwrite,
        field_name="spec.output.uri",
        home=home_for(spec.conversions[0].precision.value) if beside else "",
    )
    out.preflight()
    promo = None
    if spec.promotion:
        promo_prefix = as_prefix(spec.promotion.uri)
        promo = Target(
            run.store(promo_prefix),
            promo_prefix,
            writer,
            replace=True,
            field_name="spec.promotion.uri",
        )
        promo.preflight()
    return out, promo


def run_job(job: QuantizationJob, work: Path) -> JobResult:
    """Run one job in the work directory ``work`` (created if needed) and return its result.

    Raises the worker's KquantError subclasses (InvalidSpec, StorageError, PassError,
    ValidationFailed) with their reasons; the CLI turns them into a failed JobResult. A
    failure after the output's preflight carries ``detail["report_uri"]``: its report.json.
    """
    run, started = JobRun(job, work, Limits.from_env().started()), now()
    out, promo = open_targets(run)
    try:
        return _run(run, out, promo, started)
    except KquantError as exc:
        if "report_uri" not in exc.detail:
            exc.detail["report_uri"] = _report_failure(run, out, exc, started)
        raise


def _report_failure(run: JobRun, out: Target, exc: KquantError, started: str) -> str | None:
    """Write the failure's report.json under the output (best effort: an unreachable output
    leaves the result file as the only record); its URI, or None."""
    detail = {k: v for k, v in exc.detail.items() if k not in ("summary",)}
    report = failure_report(
        run.job,
        started=started,
        reason=exc.reason.value,
        message=str(exc),
        timings=run.timings,
        detail=detail,
    )
    try:
        uri = out.publish_failure(report)
    except KquantError as err:
        LOG.warning("could not write the failure report: %s", err)
        return None
    logs.info("failure report", uri=uri)
    return uri


def fetch_inputs(run: JobRun) -> StageInput:
    """Check the work directory's room for the job (its budget), fetch the model, the
    validation data and the calibration data into ``run.work``, and return the sandboxed
    stage's inputs; each variant's calibration data is only looked for (it is fetched when
    the variant runs). Raises StorageError (SourceNotFound, SourceTooLarge, UnsafePath...),
    before any conversion, so the dry run raises it too."""
    spec, work = run.job.spec, run.work
    work.mkdir(parents=True, exist_ok=True)
    # Beside the originals the model's folder is also the output: earlier outputs and
    # kquant's own folder are not originals.
    skip = looks_converted if spec.output.besideOriginals else None
    # One conversion's calibration is fetched here; each variant fetches its own.
    calib = spec.quantization.calibration if spec.quantization else None
    calibs = [c.calibration.uri for c in spec.conversions if c.calibration]
    samples = list(dict.fromkeys(u for u in (spec.validation.dataUri, *calibs) if u))
    space = room(work)
    factor = sum(work_factor(c, spec.model.format) for c in spec.conversions)
    checked = None if skip else _in_place(run.store(spec.model.uri), spec.model.uri)
    if checked is not None:
        factor -= 1.0  # each factor counts the source, which is read where it lies
    source_bytes = _stored_bytes(run, spec.model.uri, skip)
    sample_bytes = {uri: _stored_bytes(run, uri) for uri in samples}
    if spec.variants:  # fetched per variant, after the earlier ones ran: looked for now
        for i, config in enumerate(spec.variants):
            uri = config.calibration.uri if config.calibration else None
            if uri and not sample_bytes.get(uri):
                raise StorageError(
                    f"spec.variants[{i}].calibration.uri: nothing at {uri}",
                    reason=Reason.SourceNotFound,
                )
    check_budget(space, factor, (spec.model.uri, source_bytes), sample_bytes)
    with logs.stage("fetch", run.timings, uri=spec.model.uri):
        store = run.store(spec.model.uri)
        # A local source is read where it lies (read-only in the sandbox), not copied; with
        # besideOriginals the folder is also the output, so a copy without kquant's files.
        local = checked or (None if skip else store.read_in_place(spec.model.uri))
        in_place = local is not None
        if local is not None:
            LOG.info("reading the source in place", extra={"fields": {"path": str(local)}})
        else:
            local = store.download(spec.model.uri, work / "source", space, skip)
        # an .onnx named alone brings the external-data files it names (companions.py)
        names = companion_names(spec.model.uri, local, work, run.limits)
        companions: tuple[Path, ...] = ()
        if names:
            more = companion_bytes(store, spec.model.uri, names)
            check_budget(space, factor, (spec.model.uri, source_bytes + more), sample_bytes)
            companions = fetch_companions(store, spec.model.uri, local, names, space, in_place)
            logs.info("external data beside the model", files=len(names), bytes=more)
        data_files = fetch_npz(run, spec.validation.dataUri, "validation-data", space)
        calib_files = fetch_npz(run, calib.uri if calib else None, "calibration", space,
                                "spec.quantization.calibration.uri")  # fmt: skip
    box = work / "sandbox"
    return StageInput(
        source=local,
        data=data_files,
        data_dir=work / "validation-data",
        calib=calib_files,
        calib_dir=work / "calibration",
        staged=box / "staged",
        scratch=box / "scratch",
        companions=companions,
        external_names=None if is_prefix(spec.model.uri) else tuple(names),
    )


def plan_and_check(run: JobRun, io: StageInput, *targets: Target) -> dict[str, dict[str, Any]]:
    """Each conversion's plan (the sandboxed plan task; by variant label) and, for the names
    the set would get at each of ``targets`` (the output, the promotion; with variants every
    variant's names, as any may be chosen), what publishing would refuse there:
    ForeignObject. Raises what planning raises (InvalidSpec, PassError...) and that
    StorageError."""
    from kquant_job.variants import variant_jobs

    job = run.job
    plans = {label: run_plan(vjob, io, run.work, run.limits) for label, vjob in variant_jobs(job)}
    names: list[str] = []
    folders: list[str] = []
    for label, plan in plans.items():
        own = [m["output"] for m in plan["models"]] + list(plan["copies"].values())
        own += [k["output"] for k in plan["kept"].values() if k["output"]]
        # spec.variants: a folder model's variants go under <name>/
        prefix = f"{label}/" if job.spec.variants and not io.source.is_file() else ""
        names += [prefix + n for n in own]
        folders += plan["folders"]
    for target in targets:
        target.check_free(names, folders)
    return plans


def _run(run: JobRun, out: Target, promo: Target | None, started: str) -> JobResult:
    io = fetch_inputs(run)
    clash = [t for t in (out, promo) if t is not None and t.may_clash()]
    if clash:
        # Objects kquant did not write lie under the output or the promotion: a name the
        # set needs may be one of them. Found now (one planning task), not after the
        # conversion (a promotion's was found at the promote step, the output published).
        plan_and_check(run, io, *clash)
    if run.job.spec.variants:
        from kquant_job.pipeline_variants import run_variants

        return run_variants(run, io, out, promo, started)
    done = run_stage(run.job, io, run.work, run.limits)
    stage, run.sandbox = done["stage"], done["sandbox"]
    run.timings.update(stage.timings)
    return _publish(run, stage, io.staged, out, promo, started)


def promote(
    promo: Target,
    published: Any,
    staged: Path,
    rels: list[str],
    report: dict[str, Any],
    fields: dict[str, Any],
) -> Any:
    """Publish ``rels`` of ``staged`` at the promotion prefix, once the output is
    ``published`` (a :class:`~kquant_job.sets.publish.PublishedSet`); returns the promoted
    PublishedSet.
    A failed promotion raises its StorageError (same reason) with the output's publication
    in the message and in ``artifacts``, ``manifest_uri`` and ``report_uri``: the output stays
    published, and the result says so (trial: a run that lost the promotion to another job
    said "nothing published" while its output's manifest named its new set)."""
    try:
        promoted = promo.publish(staged, rels, report, fields)
    except StorageError as exc:
        raise StorageError(
            f"the output was published ({published.manifest_uri}); promoting it to "
            f"{promo.prefix} failed: {exc}",
            reason=exc.reason,
            report_uri=published.report_uri,
            manifest_uri=published.manifest_uri,
            artifacts=list(published.artifacts),
        ) from None
    return promoted


def _publish(
    run: JobRun,
    stage: StageOutcome,
    staged: Path,
    out: Target,
    promo: Target | None,
    started: str,
) -> JobResult:
    job, converted = run.job, stage.models
    rels = staged_files(staged)
    judged = assess(job, stage, staged)
    summary, reason, message = judged.summary, judged.reason, judged.message
    # Built once, before publishing: the output and the promotion get the same bytes.
    report = build_report(
        job,
        started=started,
        source=source_entry(job, stage),
        files=judged.files,
        models=judged.models,
        sizes=judged.sizes,
        timings=dict(run.timings),
        outcome=judged.outcome,
        providers=providers_of(stage),
        sandbox=run.sandbox,
    )
    for note in judged.notes:
        LOG.warning(note)
    if not judged.passed:
        with logs.stage("publish", run.timings, uri=out.prefix, only="report.json"):
            report_uri = out.publish_failure(report)
        raise ValidationFailed(
            message,
            reason=reason,
            report_uri=report_uri,
            summary=summary,
            originalBytes=judged.original,
            quantizedBytes=judged.quantized,
            notes=judged.notes,
            rows=judged.rows,
        )

    validation = (
        summary.model_dump(mode="json", exclude_none=True) if summary else {"skipped": True}
    )
    fields = manifest_fields(job, validation=validation)
    with logs.stage("publish", run.timings, uri=out.prefix, files=len(rels)):
        published = out.publish(staged, rels, report, fields, stage.folders)
    promoted, promoted_set = None, None
    if promo is not None:
        with logs.stage("promote", run.timings, uri=promo.prefix):
            promoted_set = promote(promo, published, staged, rels, report, fields)
        promoted = promo.prefix
    set_folder = published.report_uri.rsplit("/", 1)[0]
    converted_uris = {join(set_folder, f) for m in converted for f in m.out_files}
    artifacts = sorted(published.artifacts, key=lambda a: (a.uri not in converted_uris, a.uri))
    result = success_result(
        judged, message, artifacts, published.report_uri, published.manifest_uri, promoted
    )
    note_unfinished_copies(result, (published, out.prefix), (promoted_set, promoted))
    result._rows = judged.rows
    return result


def note_unfinished_copies(result: JobResult, *done: tuple[Any, str | None]) -> None:
    """Add a note to ``result`` for each (PublishedSet or None, prefix) whose fixed names a
    storage error left out of step after its commit (the set is published, a success, and
    readers of the fixed names get it once the next run or a rollback to it finishes the
    copies), or whose fixed names hold files kquant did not write."""
    for published, prefix in done:
        if published is None:
            continue
        if published.copies_error:
            result.notes.append(
                f"{prefix}: manifest.json names the new set, but its fixed names are not all "
                f"in step ({published.copies_error}); the next run finishes them, or "
                f"`kquant-job rollback {prefix} --to {published.set_id}` does"
            )
        foreign = published.mirrors.foreign
        if foreign:
            result.notes.append(
                f"{prefix}: {len(foreign)} fixed name(s) of the set hold files kquant did not "
                f"write and were left as they are ({', '.join(foreign[:3])}): readers of "
                "those names do not get this set; manifest.json names it"
            )
