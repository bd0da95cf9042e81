"""``kquant-job``: the worker's command line.

``kquant-job run SOURCE`` runs every QuantizationJob in SOURCE (a manifest path, or ``-`` for
JSON/YAML on stdin), writes the compact result to ``--result-file`` (default
``/dev/termination-log`` when writable) and exits with the error class's code (see
:class:`kquant_api.ExitCode`). ``run --dry-run`` prints the plans instead; ``inspect URI``
reports on a model; ``frames`` turns WAV files into feeds.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from kquant_api import REASON_EXIT_CODE, JobResult, QuantizationJob, Reason
from kquant_job import __version__, logs
from kquant_job.cli_frames import add_frames_parser
from kquant_job.cli_preview import add_inspect_parser, format_plan
from kquant_job.cli_rollback import add_rollback_parser
from kquant_job.errors import KquantError, ValidationFailed
from kquant_job.manifest import load_jobs

TERMINATION_LOG = Path("/dev/termination-log")
LOG = logging.getLogger("kquant")


def _default_result_file() -> Path | None:
    if TERMINATION_LOG.exists() and os.access(TERMINATION_LOG, os.W_OK):
        return TERMINATION_LOG
    return None


def _unwritable(path: Path) -> str | None:
    """Why the result file cannot be written (a missing folder, a directory, no
    permission), or None: it is opened for appending, which creates it and changes nothing
    in an existing one."""
    try:
        with path.open("a"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def failure_result(job: QuantizationJob | None, exc: KquantError) -> JobResult:
    """The compact result of a failed run: reason, message, the failure's report.json when
    one was written; a ValidationFailed keeps its metrics; a spec.variants run its
    comparison (``variants`` and the table's rows); a failed promotion the output it
    published (``artifacts``, ``manifestUri``)."""
    detail = exc.detail if isinstance(exc, ValidationFailed) else {}
    result = JobResult(
        phase="Failed",
        reason=exc.reason,
        message=str(exc),
        precision=job.spec.quantization.precision.value if job and job.spec.quantization else None,
        originalBytes=detail.get("originalBytes"),
        quantizedBytes=detail.get("quantizedBytes"),
        validation=detail.get("summary"),
        reportUri=exc.detail.get("report_uri"),
        manifestUri=exc.detail.get("manifest_uri"),
        artifacts=exc.detail.get("artifacts") or [],
        notes=detail.get("notes") or [],
        variants=exc.detail.get("variants") or [],
    )
    result._rows = list(exc.detail.get("rows") or [])
    return result


def make_work_dir(work_root: Path | None) -> Path:
    """A fresh private work directory (mode 0700, an absolute path) under ``work_root``
    (default: the system temp directory). Raises KquantError(WorkDirUnusable) naming the
    directory and the system's reason when it cannot be created or written."""
    where = str(work_root) if work_root else tempfile.gettempdir()
    try:
        if work_root:
            work_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="kquant-", dir=work_root)).resolve()
        (work / ".probe").write_bytes(b"")
        (work / ".probe").unlink()
        return work
    except OSError as exc:
        raise KquantError(
            f"work directory {where} is unusable: {exc.strerror or exc} (set --work-dir or "
            "KQUANT_WORK_DIR to a writable directory; in a pod, the /work emptyDir)",
            reason=Reason.WorkDirUnusable,
        ) from None


def _run_one(job: QuantizationJob, work_root: Path | None, keep: bool) -> JobResult:
    from kquant_job.pipeline import run_job

    try:
        work = make_work_dir(work_root)
    except KquantError as exc:
        LOG.error("%s: %s", exc.reason.value, exc, extra={"fields": {"reason": exc.reason.value}})
        return failure_result(job, exc)
    try:
        return run_job(job, work)
    except KquantError as exc:
        LOG.error("%s: %s", exc.reason.value, exc, extra={"fields": {"reason": exc.reason.value}})
        return failure_result(job, exc)
    except Exception as exc:  # the result must still be written for the operator
        LOG.exception("unexpected error", extra={"fields": {"reason": "InternalError"}})
        return JobResult(
            phase="Failed", reason=Reason.InternalError, message=f"{type(exc).__name__}: {exc}"
        )
    finally:
        if keep:
            LOG.info("work directory kept", extra={"fields": {"path": str(work)}})
        else:
            shutil.rmtree(work, ignore_errors=True)


def _table(result: JobResult, name: str) -> str:
    """A short human summary: sizes, reduction, max abs error, latency."""
    rows = [("job", name), ("phase", f"{result.phase} ({result.reason.value})")]
    if result.originalBytes and result.quantizedBytes:
        o, q = result.originalBytes, result.quantizedBytes
        rows += [
            ("original", f"{o:,} bytes"),
            ("quantized", f"{q:,} bytes ({q / o:.2f}x the original)"),
            ("reduction", f"{100 * (1 - q / o):.1f} %"),
        ]
    v = result.validation
    if result.reason is Reason.Converted:
        rows.append(("validation", "skipped: spec.validation.enabled is false"))
    if v:
        verdict = "passed" if v.passed else "FAILED"
        if v.kind == "tensors":
            what = "weights compared tensor by tensor"
        elif v.kind == "mixed":
            what = f"outputs on {v.samples} samples, other models' weights tensor by tensor"
        else:
            what = f"outputs on {v.samples} samples"
        rows.append(("validation", f"{verdict}: {what} ({v.device})"))
        if v.inputs:
            rows.append(("inputs", f"{v.inputs} (found by kquant)"))
        what = "tensor" if v.kind == "tensors" else "output"
        if v.maxAbsError is not None:
            rows.append(("max abs error", f"{v.maxAbsError:.3g} (the largest of any {what})"))
        if v.cosineSimilarity is not None:
            rows.append(
                ("cosine similarity", f"{v.cosineSimilarity:.6f} (the lowest of any {what})")
            )
        if v.latencyMs:
            o, q = v.latencyMs.original, v.latencyMs.quantized
            ratio = f" ({q / o:.2f}x)" if o > 0 else ""
            runs = f", {v.latencyMs.runs} runs each" if v.latencyMs.runs else ""
            rows.append(("latency (median)", f"{o:.3f} ms -> {q:.3f} ms{ratio}{runs}"))
            if v.latencyMs.interleavedRatio is not None:  # what the gain rule judged
                rows.append(("latency (blocks)", f"{v.latencyMs.interleavedRatio:.2f}x in "
                             f"blocks of each model in turn, {v.latencyMs.interleavedRuns} "
                             "runs each"))  # fmt: skip
    rows += result._rows
    rows += [("NOTE", note) for note in result.notes]
    if result.manifestUri:
        rows.append(("manifest", result.manifestUri))
    if result.reportUri:
        rows.append(("report", result.reportUri))
    if result.promotedUri:
        rows.append(("promoted", result.promotedUri))
    if result.phase != "Succeeded":
        rows.append(("message", result.message))
    # rows quote the model (its output and tensor names): one line each, escapes shown
    rows = [(logs.printable(str(k)), logs.printable(str(v))) for k, v in rows]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _dry_run_one(job: QuantizationJob, work_root: Path | None, keep: bool) -> int:
    """Print one job's plan; returns its exit code (the error class's, else 0)."""
    from kquant_job.preview import dry_run

    work = None
    try:
        work = make_work_dir(work_root)
        print(format_plan(job.metadata.name, dry_run(job, work)), flush=True)
        return 0
    except KquantError as exc:
        LOG.error("%s: %s", exc.reason.value, exc, extra={"fields": {"reason": exc.reason.value}})
        print(f"  job: {job.metadata.name} (dry run)\n  {exc.reason.value}: {exc}", flush=True)
        return int(REASON_EXIT_CODE[exc.reason])
    finally:
        if work is not None and not keep:
            shutil.rmtree(work, ignore_errors=True)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the jobs of a manifest (``--dry-run``: print their plans); returns the exit code
    (first failure's, else 0)."""
    result_file = Path(args.result_file) if args.result_file else _default_result_file()
    if result_file and not args.dry_run:
        unusable = _unwritable(result_file)
        if unusable:  # before any work: in a pod, a run that published and then failed
            print(f"kquant-job: --result-file {result_file}: {unusable}", file=sys.stderr)
            return 2  # would be retried as exit 1 and run again
    results: list[JobResult] = []
    names: list[str] = []
    try:
        jobs = load_jobs(args.source, spec_env=args.spec_env)
    except KquantError as exc:
        LOG.error("%s: %s", exc.reason.value, exc, extra={"fields": {"reason": exc.reason.value}})
        if args.dry_run:  # a dry run writes no result file, whatever it finds (new-user trial)
            return failure_result(None, exc).exit_code
        # no job: the table says what was read and what was wrong with it (it said "job
        # manifest", whatever was read: new-user trial)
        failed = failure_result(None, exc)  # its rows: load_jobs's spec row
        if not failed._rows:
            failed._rows.append(("spec", "the manifest was not loaded"))
        results, names = [failed], ["none"]
    else:
        work_root = Path(args.work_dir) if args.work_dir else None
        if args.dry_run:
            codes = [_dry_run_one(job, work_root, args.keep_work) for job in jobs]
            return next((c for c in codes if c), 0)
        for job in jobs:
            results.append(_run_one(job, work_root, args.keep_work))
            names.append(job.metadata.name)
    if result_file:
        # One compact JSON object per job, one per line (a single job: a single object).
        result_file.write_text("\n".join(r.to_json() for r in results) + "\n")
    for result, name in zip(results, names, strict=True):
        print(_table(result, name), flush=True)
    codes = [r.exit_code for r in results if r.exit_code]
    return codes[0] if codes else 0


EXIT_CODES = """exit codes (one per error class; the result file says the reason):
  0   Validated, or Converted (validation disabled)
  10  InvalidSpec
  20  storage: SourceNotFound, AccessDenied, OutputExists, UnsafePath, SourceTooLarge,
      ForeignObject, ConcurrentWrite, Superseded, StorageRejected
  21  StorageUnavailable (retriable: the storage did not answer)
  30  conversion: UnsupportedFormat, CorruptModel, UnsafeModel, ConversionFailed,
      AlreadyQuantized, ModelCrashed, MemoryLimitExceeded, TimeLimitExceeded,
      DiskLimitExceeded
  40  ValidationFailed, NoGain (within tolerance, but not smaller or slower)
  1   WorkDirUnusable, SandboxUnavailable, InternalError (retriable)
  2   a command-line error, or a --result-file that cannot be written (nothing run)"""

RUN_EXAMPLES = """examples:
  kquant-job run job.yaml                 run every QuantizationJob in job.yaml
  kubectl get qjob vad -o json | kquant-job run      the manifest on stdin (SOURCE omitted)
  kquant-job run job.yaml --keep-work --work-dir /tmp/kq   keep the work directory to look at
  kquant-job run job.yaml --dry-run       the plan: files converted, copied, kept; names; inputs

A minimal job (file:// or s3:// URIs):
  apiVersion: kquant.io/v1alpha1
  kind: QuantizationJob
  metadata: {name: vad}
  spec:
    model: {uri: file:///models/model.onnx}
    output: {uri: file:///models/out/}
    quantization: {precision: fp16}
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kquant-job``."""
    parser = argparse.ArgumentParser(
        prog="kquant-job",
        description=__doc__.splitlines()[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kquant {__version__}")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text (default) or json: one JSON object per log line",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run the QuantizationJob(s) of a manifest",
        description="Fetch, convert, validate and publish every QuantizationJob of a "
        "manifest; one compact JSON result per job goes to the result file.",
        epilog=f"{RUN_EXAMPLES}\n{EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "source",
        nargs="?",
        default="-",
        help="manifest path (YAML or JSON, several documents allowed); omitted or - : read "
        "the manifest from stdin",
    )
    run.add_argument(
        "--spec-env", metavar="VAR", help="read the manifest (JSON) from this environment variable"
    )
    run.add_argument(
        "--result-file",
        metavar="PATH",
        help="where the compact JSON result goes (default /dev/termination-log "
        "when it exists and is writable)",
    )
    run.add_argument(
        "--work-dir",
        metavar="DIR",
        default=os.environ.get("KQUANT_WORK_DIR"),
        help="parent of the per-job work directory (default: $KQUANT_WORK_DIR "
        "or the system temp dir)",
    )
    run.add_argument("--keep-work", action="store_true", help="keep the work directory")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check the spec, the output and the model, and print the plan (files converted, "
        "copied, kept; output names; validation inputs) without converting or writing "
        "anything (no result file either)",
    )
    run.set_defaults(func=cmd_run)
    add_frames_parser(sub)
    add_inspect_parser(sub)
    add_rollback_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kquant-job`` console script."""
    args = build_parser().parse_args(argv)
    logs.setup_logging(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
