"""The stage that touches model files: plan, convert, validate. It runs inside the sandbox
(:mod:`kquant_job.sandbox`): model files are read, parsed and executed here only, and what it
hands back is plain data (:class:`StageOutcome`, JSON) plus the files it staged.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kquant_api import ModelFormat, Precision, QuantizationJob, Reason
from kquant_api.spec import Preprocess
from kquant_job import logs, prefetch
from kquant_job.beside import OutputNames, plan_names
from kquant_job.errors import InvalidSpec, PassError, StorageError
from kquant_job.formats import ModelFile, Plan, plan_model
from kquant_job.passes import PassContext, select_pass
from kquant_job.passes.onnx_options import check_names
from kquant_job.pinned import file_sha256, pinned_digest
from kquant_job.stage_prep import embed_again, export_folder, pass_label, spill, spills

# Formats whose files hold code that runs when they are loaded or validated.
CODE_FORMATS = frozenset({ModelFormat.torchscript})


@dataclass
class ModelOutcome:
    """One converted model, as plain data: source path (relative to the source root), format
    and external data files; output path and the files it wrote (relative to the staged
    folder); sizes in bytes; the pass and its details; the validation (``kind``, the
    validator's ``report``, ``summary`` as a ValidationSummary dict, ``violations``,
    ``passed``; None when validation is off) and the execution providers used."""

    source: str
    format: str
    external: list[str]
    out_rel: str
    out_files: list[str]
    original_bytes: int
    quantized_bytes: int
    pass_name: str
    details: dict[str, Any]
    validation: dict[str, Any] | None = None
    providers: list[str] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)  # out file -> digest, model code ran


@dataclass
class StageOutcome:
    """What the stage produced: one entry per converted model, the files to copy unchanged
    (``copies``, output paths; ``copied_from``: output path -> source path relative to the
    source root, copied by the worker after the stage: :func:`kquant_job.sandbox.accept.
    accept_staged`, at most ``copy_bytes``, their sizes when planned; ``kept``: the model
    files among them left unconverted, with the reason),
    the stage timings (ms), the source files left out of the set (``left``: loose files
    beside the originals) and the set's own output folders (``folders``). ``sha256`` of a
    model is set when the stage ran model code (TorchScript): the digest of each output
    file as the conversion wrote it."""

    models: list[ModelOutcome]
    copies: list[str]
    kept: dict[str, str]
    timings: dict[str, float]
    left: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    copied_from: dict[str, str] = field(default_factory=dict)
    copy_bytes: dict[str, int] = field(default_factory=dict)  # output path -> size when planned

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageOutcome:
        """Parse :meth:`to_json`'s output. Raises TypeError/KeyError on a malformed one."""
        return cls(
            models=[ModelOutcome(**m) for m in data["models"]],
            copies=[str(c) for c in data["copies"]],
            kept={str(k): str(v) for k, v in data["kept"].items()},
            timings={str(k): float(v) for k, v in data["timings"].items()},
            left=[str(c) for c in data.get("left", [])],
            folders=[str(c) for c in data.get("folders", [])],
            copied_from={str(k): str(v) for k, v in data.get("copied_from", {}).items()},
            copy_bytes={str(k): int(v) for k, v in data.get("copy_bytes", {}).items()},
        )


def files_under(root: Path) -> set[str]:
    """Relative paths of the regular files below ``root``."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _bytes(root: Path, rels: list[str]) -> int:
    return sum((root / r).stat().st_size for r in rels)


def _files_for(model: ModelFile, files: list[Path], base: Path, many: bool) -> list[Path]:
    """Sample files for one model: all of them for a single model; for a directory with
    several models, those under a sub-folder named after the model's relative path, else
    those at the top of the folder (shared by every model without a folder of its own)."""
    if not many:
        return files
    sub = base / model.rel
    own = [f for f in files if sub in f.parents]
    return own or [f for f in files if f.parent == base]


def _check_model_keys(models: dict[str, Any], plan: Plan) -> None:
    """Refuse a ``spec.validation.models`` key that matches no model file."""
    import fnmatch

    rels = [m.rel for m in plan.models]
    for key in models:
        if not any(fnmatch.fnmatchcase(x, key) for r in rels for x in (r, r.rsplit("/", 1)[-1])):
            raise InvalidSpec(
                f"spec.validation.models.{key}: matches no model file (models: {', '.join(rels)})"
            )


@dataclass
class _Converted:
    outcome: ModelOutcome
    validator: Any  # kquant_job.validate.validators.Validator, when validation is on


@dataclass(frozen=True)
class StageInput:
    """Where the stage finds its inputs and puts its outputs: the fetched model ``source`` (a
    file or a directory), the ``.npz`` validation and calibration feeds and the folders they
    were fetched into (per-model sub-folders in a model directory), the ``staged`` folder for
    the converted set and the ``scratch`` folder for working files; ``shared_reference``:
    the folder where the variants of one job share their FP32 reference pass (None
    outside variants; :mod:`kquant_job.validate.reference_cache`); ``companions``: the
    external-data files of a single-file source read in place beside it (the sandbox may
    read them; :mod:`kquant_job.companions`); ``external_names``: for a single-file source,
    the external-data locations the worker already read from it (None: unknown, the plan
    reads them)."""

    source: Path
    data: list[Path]
    data_dir: Path
    calib: list[Path]
    calib_dir: Path
    staged: Path
    scratch: Path
    shared_reference: Path | None = None
    companions: tuple[Path, ...] = ()
    external_names: tuple[str, ...] | None = None


def convert_and_validate(job: QuantizationJob, io: StageInput) -> StageOutcome:
    """Plan the fetched model, convert every model file into ``io.staged`` (working files in
    ``io.scratch``), copy the other files, and validate each converted model against its
    original on the validation feeds. Raises the worker's KquantErrors (InvalidSpec,
    PassError...)."""
    staged = io.staged
    timings: dict[str, float] = {}
    plan = _plan(job, io)
    names = _names(job, plan, io)
    for rel, why in plan.kept.items():
        logs.info(f"kept {rel} as it is", file=rel, why=why)
    for warning in plan.warnings:
        logs.LOG.warning(warning)
    if names.left:
        logs.info("left alone beside the originals", files=len(names.left))
    staged.mkdir(parents=True, exist_ok=True)
    converted = _convert_all(job, plan, names, io, timings)
    with logs.stage("validate", timings):
        _validate_all(converted, staged)
    _refuse_strays(staged, converted)
    kept = {names.copies[r]: why for r, why in plan.kept.items() if r in names.copies}
    copied_from = {out: rel for rel, out in names.copies.items()}
    sizes = {out: (plan.root / rel).stat().st_size for out, rel in copied_from.items()}
    return StageOutcome(
        [c.outcome for c in converted], list(copied_from), kept, timings, names.left,
        names.folders, copied_from, sizes,
    )  # fmt: skip


def _refuse_strays(staged: Path, converted: list[_Converted]) -> None:
    """PassError(UnsafeModel) when ``staged`` holds a file no conversion wrote: model code
    (TorchScript's ``torch.from_file(..., shared=True)`` creates files) wrote into the
    output. The worker checks it again after the stage (what the stage says is only as sure
    as the process that ran model code; :func:`kquant_job.pipeline.accept_staged`)."""
    own = {f for c in converted for f in c.outcome.out_files}
    strays = sorted(files_under(staged) - own)
    if strays:
        raise stray_files(strays)


def stray_files(strays: list[str]) -> PassError:
    """The error for files in the staged output that no conversion wrote."""
    return PassError(
        f"the output holds {', '.join(strays[:3])}{' ...' if len(strays) > 3 else ''}, which "
        "no conversion wrote: the model's code wrote files (a model file is code; it may only "
        "read itself); nothing is published",
        reason=Reason.UnsafeModel,
    )


def _names(job: QuantizationJob, plan: Plan, io: StageInput) -> OutputNames:
    spec = job.spec
    config = spec.quantization
    assert config is not None  # one conversion per stage: variants run one stage each
    names = plan_names(plan, config.label, io.source.is_file(), spec.output.besideOriginals)
    if not spec.output.besideOriginals:  # there kquant's own names live under .kquant/
        _refuse_reserved(spec.model.uri, [*names.models.values(), *names.copies.values()])
    return names


# Names at the top of an output that are kquant's own (kquant_job.sets): the manifest, the
# report and the bookkeeping folder.
_RESERVED = ("manifest.json", "report.json")


def _refuse_reserved(uri: str, outputs: list[str]) -> None:
    """StorageError(UnsafePath) when a file of the model folder would be published under
    one of kquant's own names, found when planning (before: after the conversion, when
    publishing)."""
    clash = sorted(o for o in outputs if o in _RESERVED or o.split("/")[0] == ".kquant")
    if clash:
        raise StorageError(
            f"{uri} holds {', '.join(clash[:3])}: at the top of the output these names are "
            "kquant's own (its manifest.json, report.json and .kquant/ folder), so the folder "
            "cannot be published as it is. Move or rename them in the model folder (an "
            "earlier kquant output? name the model files themselves, or their own folder)",
            reason=Reason.UnsafePath,
        )


def _plan(job: QuantizationJob, io: StageInput) -> Plan:
    """The plan of the fetched model, with the spec's names checked against it."""
    spec = job.spec
    include, exclude = spec.quantization.include, spec.quantization.exclude
    needs_code = spec.quantization.precision in (Precision.int8, Precision.int4)
    plan = plan_model(io.source, spec.model.format, include, exclude, needs_code, io.external_names)
    _check_model_keys(spec.validation.models, plan)
    onnx_models = [plan.root / m.rel for m in plan.models if m.format is ModelFormat.onnx]
    check_names(spec.quantization, onnx_models)
    return plan


def _validator(
    job: QuantizationJob,
    model: ModelFile,
    src: Path,
    io: StageInput,
    many: bool,
    fmt: ModelFormat | None = None,
) -> Any:
    """The model's validator (None when validation is off), its inputs logged; ``fmt``: the
    format of ``src`` when it is not the model's (an exported Hugging Face folder)."""
    from kquant_job.validate.validators import make_validator

    spec = job.spec
    if not spec.validation.enabled:
        return None
    samples = _files_for(model, io.data, io.data_dir, many)
    if io.data:
        logs.info(f"validation data for {model.rel}", files=len(samples))
    own = spec.model_copy(update={"validation": spec.validation.for_model(model.rel)})
    shared = None
    if io.shared_reference is not None:  # one folder per model file of the set
        shared = io.shared_reference / hashlib.sha256(model.rel.encode()).hexdigest()[:16]
    try:
        validator = make_validator(fmt or model.format, src, own, samples, shared)
    except InvalidSpec as exc:  # name the field the user wrote (new-user trial)
        field = spec.validation.feedback_field(model.rel)
        text = str(exc)
        if field != "spec.validation.feedback" and text.startswith("spec.validation.feedback"):
            raise InvalidSpec(field + text.removeprefix("spec.validation.feedback")) from None
        raise
    if validator.chosen:
        logs.info(
            f"validation inputs for {model.rel} (found in {validator.chosen['tries']} tries)",
            inputs=validator.chosen["inputs"],  # names the model chose: never as keywords
        )
    return validator


def plan_stage(job: QuantizationJob, io: StageInput) -> dict[str, Any]:
    """The dry run: what :func:`convert_and_validate` would do, converting nothing. Returns
    ``{"models": [{source, format, pass, output, bytes, external, validation, refused}], "copies"
    (source -> output path), "kept" (model files copied unconverted: source -> {why, output:
    its copy's path}), "left" (source files not published), "leftWhy" (source -> why, for
    the model files among them a pattern kept), "folders" (the set's output folders),
    "warnings"}``; ``validation`` is None when off, else ``{kind, inputs}`` with the inputs
    chosen (found by kquant, or the number of sample files); ``refused`` None, or the
    ``{reason, message}`` an ONNX pass would refuse the model with before converting (then
    its validation inputs are not searched).
    Validation inputs are found by running the original model, in the sandbox. Raises as
    :func:`convert_and_validate` does before converting."""
    cfg = job.spec.quantization
    plan = _plan(job, io)
    names = _names(job, plan, io)
    many = len(plan.models) > 1
    models = []
    for model in plan.models:
        src = plan.root / model.rel
        if model.format is ModelFormat.pytorch:
            # the run's weights_only load (tensors memory-mapped, not read): a pickle the run
            # refuses as UnsafeModel fails the dry run too (hostile-input trial: it passed)
            from kquant_job.passes.torch_common import load_checkpoint

            load_checkpoint(src, model.rel)
        exported = model.format is ModelFormat.transformers
        refused = (
            _refusal(src, model.rel, cfg.precision) if model.format is ModelFormat.onnx else None
        )
        validator = None if exported or refused else _validator(job, model, src, io, many)
        validation = None
        if exported and job.spec.validation.enabled:
            validation = {"kind": "outputs", "inputs": "found on the ONNX export, when run"}
        if validator is not None:
            if validator.chosen:
                inputs: Any = validator.chosen["inputs"]
            elif validator.kind == "tensors":
                inputs = "none: weights are compared tensor by tensor"
            else:
                inputs = f"{len(_files_for(model, io.data, io.data_dir, many))} sample file(s)"
            validation = {"kind": validator.kind, "inputs": inputs}
        models.append(
            {
                "source": model.rel,
                "format": model.format.value,
                "pass": pass_label(model.format, select_pass(model.format, cfg).name),
                "output": names.models[model.rel],
                "bytes": _bytes(plan.root, [model.rel, *model.external]),
                "external": list(model.external),
                "validation": validation,
                "refused": refused,
            }
        )
    copies = {c: out for c, out in names.copies.items() if c not in plan.kept}
    # each file in one category: a kept model file beside the originals that no folder
    # takes is left alone, not kept (new-user trial: an excluded hift.pt was listed as both)
    kept = {c: {"why": why, "output": names.copies[c]} for c, why in plan.kept.items()
            if c in names.copies}  # fmt: skip
    left_why = {c: plan.kept[c] for c in names.left if c in plan.kept}
    return {"models": models, "copies": copies, "kept": kept, "left": names.left,
            "leftWhy": left_why, "folders": names.folders, "warnings": plan.warnings}  # fmt: skip


def _refusal(src: Path, rel: str, precision: Precision) -> dict[str, str] | None:
    """What the ONNX pass would refuse ``src`` with before converting, from its graph
    (:func:`kquant_job.passes.onnx_refusals.refuse`): ``{reason, message}``, or None."""
    import onnx

    from kquant_job.passes.onnx_refusals import refuse

    try:
        refuse(onnx.load(str(src), load_external_data=False), rel, precision)
    except PassError as exc:
        return {"reason": exc.reason.value, "message": str(exc)}
    return None


def _convert_all(
    job: QuantizationJob,
    plan: Plan,
    names: OutputNames,
    io: StageInput,
    timings: dict[str, float],
) -> list[_Converted]:
    staged = io.staged
    cfg, many = job.spec.quantization, len(plan.models) > 1
    results = []
    # Models holding code (TorchScript) last: the other outputs are written and their digests
    # taken before any model code runs in this process (kquant_job.pinned).
    code = any(m.format in CODE_FORMATS for m in plan.models)
    onnx_only = all(m.format is ModelFormat.onnx for m in plan.models)
    if cfg.precision is Precision.int8 and cfg.preprocess is not Preprocess.never and onnx_only:
        # sympy, while the reference pass runs; ONNX only: the import hides torch for a
        # moment (int8_prepare.import_quant_pre_process), which a torch pass would miss
        from kquant_job.passes.int8_prepare import import_quant_pre_process

        prefetch.start(import_quant_pre_process)
    order = sorted(enumerate(plan.models), key=lambda im: im[1].format in CODE_FORMATS)
    with logs.stage("convert", timings, models=len(plan.models)):
        for i, model in order:
            src, fmt, export = plan.root / model.rel, model.format, None
            if fmt is ModelFormat.transformers:
                src, export = export_folder(cfg, plan.root, io.scratch / f"{i}-export", timings)
                fmt = ModelFormat.onnx
            spilled = export is None and spills(fmt, cfg, model, src)
            if spilled:
                src = spill(src, io.scratch / f"{i}-spilled")
            pass_ = select_pass(fmt, cfg)
            out_rel = names.models[model.rel]
            out_path = staged / out_rel
            out_path.parent.mkdir(parents=True, exist_ok=True)
            validator = _validator(job, model, src, io, many, fmt)
            ctx = PassContext(
                work_dir=io.scratch / str(i),
                probe=validator.probe if validator else None,
                activation_ranges=getattr(validator, "activation_ranges", None),
                calibration_files=_files_for(model, io.calib, io.calib_dir, many),
            )
            ctx.work_dir.mkdir(parents=True, exist_ok=True)
            before = files_under(staged)
            logs.info(
                f"convert {model.rel}",
                model=model.rel,
                **{"pass": pass_.name},
                bytes=src.stat().st_size,
            )
            result = pass_.run(src, cfg, out_path, ctx)
            if spilled:
                embed_again(out_path)
            if export is not None:
                result.details["export"] = export
            out_files = _written(staged, out_rel, before)
            outcome = ModelOutcome(
                source=model.rel,
                format=model.format.value,
                external=list(model.external),
                out_rel=out_rel,
                out_files=out_files,
                original_bytes=_bytes(plan.root, [model.rel, *model.external]),
                quantized_bytes=_bytes(staged, out_files),
                pass_name=pass_label(model.format, pass_.name),
                details=result.details,
                providers=list(validator.providers) if validator else [],
            )
            if code:
                outcome.sha256 = {
                    f: pinned_digest(staged / f) or file_sha256(staged / f) for f in out_files
                }
            if many and validator is not None and hasattr(validator, "reference"):
                validator.reference.drop_kept()  # never held beside the next conversion
            results.append(_Converted(outcome, validator))
    results.sort(key=lambda c: [m.rel for m in plan.models].index(c.outcome.source))
    return results


def _written(staged: Path, out_rel: str, before: set[str]) -> list[str]:
    """The files a conversion wrote: its model file and the external data it references
    (ONNX). Raises PassError(UnsafeModel) for any other new file (see
    :func:`_refuse_strays`)."""
    from kquant_job.passes.onnx_common import data_file_for  # onnx: not in the worker

    new = files_under(staged) - before
    own = {out_rel} & new
    data = data_file_for(staged / out_rel).relative_to(staged).as_posix()
    own |= {data} & new
    if new - own and out_rel.endswith(".onnx"):
        from kquant_job.formats import external_locations

        base = PurePosixPath(out_rel).parent
        own |= {(base / loc).as_posix() for loc in external_locations(staged / out_rel)} & new
    if new - own:
        raise stray_files(sorted(new - own))
    return sorted(own)


def _validate_all(converted: list[_Converted], staged: Path) -> None:
    from kquant_job.validate.runtime import release_memory
    from kquant_job.validate.tensors import MAX_VIOLATIONS
    from kquant_job.validate.validators import log_rows

    for item in converted:
        model = item.outcome
        if item.validator is None:
            continue
        release_memory()  # the conversion's freed pages, before the sessions of validation
        outcome = item.validator.validate(staged / model.out_rel)
        summary = outcome.summary()
        chosen = item.validator.chosen
        if chosen:
            text = "; ".join(f"{k} {v}" for k, v in chosen["inputs"].items())
            summary = summary.model_copy(update={"inputs": text})
        model.validation = {
            "kind": item.validator.kind,
            "report": {**outcome.to_report(), **({"inputsChosen": chosen} if chosen else {})},
            "summary": summary.model_dump(mode="json", exclude_none=True),
            # the report has the first; 400 000 tensors' violations overflowed the outcome
            "violations": list(outcome.violations[:MAX_VIOLATIONS]),
            "passed": bool(outcome.passed),
        }
        for label, fields in log_rows(outcome):
            logs.info(label, **fields)
        logs.info(
            f"validated {model.source}",
            passed=outcome.passed,
            kind=item.validator.kind,
            device=outcome.device,
            **{
                k: v
                for k, v in summary.model_dump(exclude_none=True).items()
                if k in ("maxAbsError", "cosineSimilarity")
            },
        )
