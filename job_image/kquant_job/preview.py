"""Looking before converting: ``kquant-job run --dry-run`` and ``kquant-job inspect``.

Both read only. The dry run does what a run does up to the conversion (the spec's checks, the
output's and promotion's preflight, the work directory's budget, the fetch), then plans in the
sandbox: which files are converted, copied or kept, the output names, the validation inputs
(found by running the original model, as a run would). Inspection fetches a model file or
folder and reports what it holds (:mod:`kquant_job.inspect_model`), also in the sandbox: a
model file is hostile until proven otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kquant_api import QuantizationJob, Reason
from kquant_api.spec import StorageConfig
from kquant_job.budget import check_budget, room
from kquant_job.companions import companion_bytes, companion_names, fetch_companions
from kquant_job.errors import PassError
from kquant_job.pipeline import JobRun, fetch_inputs, open_targets, plan_and_check
from kquant_job.sandbox.limits import Limits
from kquant_job.sandbox.runner import run_task
from kquant_job.sets.layout import KQUANT_DIR
from kquant_job.storage import open_storage


def dry_run(job: QuantizationJob, work: Path) -> dict[str, Any]:
    """The plan of ``job`` (work files in ``work``), publishing nothing: ``{"output",
    "promotion", "plan"}``, ``plan`` as :func:`kquant_job.stage.plan_stage` returns it (the
    first variant's; with spec.variants also ``"variants"``: each variant's plan by name).
    Raises what a run raises before converting: InvalidSpec, the preflight's StorageErrors
    (OutputExists, ForeignObject, Superseded), the fetch's (SourceNotFound, SourceTooLarge,
    UnsafePath), PassError for a model that does not load or run, and ForeignObject for an
    output name held by an object kquant did not write."""
    run = JobRun(job, work, Limits.from_env())
    out, promo = open_targets(run)
    io = fetch_inputs(run)
    plans = plan_and_check(run, io, *(t for t in (out, promo) if t is not None))
    dry = {"output": out.prefix, "promotion": promo.prefix if promo else None}
    dry["plan"] = next(iter(plans.values()))
    refused = [m["refused"] for m in dry["plan"]["models"] if m.get("refused")]
    if refused and not job.spec.variants:  # the run fails with it; a variant's is listed
        raise PassError(refused[0]["message"], reason=Reason(refused[0]["reason"]))
    if job.spec.variants:
        dry["variants"] = plans
    return dry


def inspect_uri(
    uri: str,
    work: Path,
    storage: StorageConfig | None = None,
    op_type: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Report on the model file or folder at ``uri`` (see
    :func:`kquant_job.inspect_model.inspect_path`; ``op_type``/``name`` filter the node
    list), in the sandbox: a local one (``file://``, a path) read where it lies, as a run
    reads it (before, it was copied into ``work`` first), one on ``s3://`` (``storage``'s
    endpoint settings) fetched into ``work`` without an output prefix's ``.kquant/``. A
    single ``.onnx`` brings the external-data files it names, as a run does
    (:mod:`kquant_job.companions`). Raises StorageError (SourceNotFound, SourceTooLarge,
    UnsafePath), PassError (UnsupportedFormat, CorruptModel, UnsafeModel,
    ModelCrashed...)."""
    work.mkdir(parents=True, exist_ok=True)
    store, space, limits = open_storage(uri, storage), room(work), Limits.from_env()
    own: list[str] = []  # an output prefix's .kquant/: kquant's sets, which the names copy

    def kquant_own(rel: str) -> bool:
        if rel.startswith(KQUANT_DIR):
            own.append(rel)
        return rel.startswith(KQUANT_DIR)

    local = store.read_in_place(uri)
    in_place = local is not None
    if local is None:
        local = store.download(uri, work / "source", space, skip=kquant_own)
    names = companion_names(uri, local, work, limits)
    companions: tuple[Path, ...] = ()
    if names:
        more = companion_bytes(store, uri, names)
        if not in_place:
            check_budget(space, 1.0, (uri, local.stat().st_size + more), {})
        companions = fetch_companions(store, uri, local, names, space, in_place=in_place)
    task = {"task": "inspect", "inspect": {"path": str(local.resolve()), "opType": op_type}}
    if name:
        task["inspect"]["name"] = name
    read = [work, local, *companions]
    result, _ = run_task(task, work / "sandbox", read, limits, what="inspection")
    skipped = len(own) + result.pop("kquantFiles", 0)
    return {"uri": uri, **result, **({"kquantFiles": skipped} if skipped else {})}
