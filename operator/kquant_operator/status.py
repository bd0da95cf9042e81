"""Job + Pods -> QuantizationJob status: pure functions, no cluster access.

Conditions follow kstatus (https://github.com/kubernetes-sigs/cli-utils/tree/master/pkg/kstatus):
``Ready`` summarises, ``Reconciling`` is True while the Job is pending, queued or running,
``Stalled`` is True when only a spec change can help (a failed run, an invalid spec). All
three are always written, each with the ``observedGeneration`` it describes; a condition's
``lastTransitionTime`` changes only when its status does.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from kquant_api import JobResult, Phase, QuantizationJobStatus, Reason
from kquant_operator.jobs import LABEL_GENERATION, LABEL_QUEUE, job_name, to_plain
from kquant_operator.podstate import (
    Terminated,
    belongs,
    is_running,
    latest_terminated,
    log_tail,
    pending_reason,
)

TERMINAL = (Phase.Succeeded.value, Phase.Failed.value)
_EVENT_MESSAGE_LIMIT = 1024


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(qjob: dict[str, Any]) -> tuple[str, int | None]:
    meta = qjob.get("metadata") or {}
    return meta.get("name") or "", meta.get("generation")


def is_finished(qjob: dict[str, Any]) -> bool:
    """True when the status already holds a final verdict for the current generation: the
    handler must not create a Job then (after ``ttlSecondsAfterFinished`` the Job is gone,
    and a new one would run the conversion again)."""
    status = qjob.get("status") or {}
    generation = _meta(qjob)[1]
    return (
        generation is not None
        and status.get("observedGeneration") == generation
        and status.get("phase") in TERMINAL
    )


def _conditions(
    qjob: dict[str, Any], flags: dict[str, bool], reason: str, message: str, now: str
) -> list[dict[str, Any]]:
    previous = {c.get("type"): c for c in (qjob.get("status") or {}).get("conditions") or []}
    out = []
    for ctype, value in flags.items():
        status = "True" if value else "False"
        prev = previous.get(ctype) or {}
        same = prev.get("status") == status and prev.get("lastTransitionTime")
        out.append(
            {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": prev["lastTransitionTime"] if same else now,
                "observedGeneration": _meta(qjob)[1],
            }
        )
    return out


def _status(
    qjob: dict[str, Any],
    phase: Phase,
    reason: str,
    message: str,
    now: str,
    *,
    stalled: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    if phase is Phase.Succeeded:
        flags = {"Ready": True, "Reconciling": False, "Stalled": False}
    elif phase is Phase.Failed or stalled:
        flags = {"Ready": False, "Reconciling": False, "Stalled": True}
    else:
        flags = {"Ready": False, "Reconciling": True, "Stalled": False}
    status = {
        "phase": phase.value,
        "reason": reason,
        "message": message,
        "observedGeneration": _meta(qjob)[1],
        "conditions": _conditions(qjob, flags, reason, message, now),
        **fields,
    }
    return QuantizationJobStatus.model_validate(status).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )


def _result_status(result: JobResult) -> dict[str, Any]:
    data = result.model_dump(
        mode="json",
        exclude_none=True,
        include={
            "artifacts",
            "artifactsTruncated",
            "originalBytes",
            "quantizedBytes",
            "validation",
            "reportUri",
            "manifestUri",
            "promotedUri",
            "notes",
            "precision",
            "chosen",
            "variants",
        },
    )
    for key in ("notes", "variants"):
        if not data.get(key):
            data.pop(key, None)
    if result.originalBytes and result.quantizedBytes is not None:
        data["reductionPercent"] = round(
            100 * (1 - result.quantizedBytes / result.originalBytes), 2
        )
    return data


def lost_status(qjob: dict[str, Any], jname: str, now: str | None = None) -> dict[str, Any]:
    """The status of a generation whose Job was deleted before its result was read (by a
    person, or by ``ttlSecondsAfterFinished`` while the operator was down): phase Failed,
    reason JobDeleted, Stalled. The generation is not run again on its own: its
    conversion may have published already."""
    qjob = to_plain(qjob)
    message = (
        f"Job {jname} was deleted before the operator read its result; what it did is unknown "
        "(the output's report.json says) and it is not run again: change the spec, or delete "
        "and re-create this QuantizationJob, to run it again"
    )
    return _status(qjob, Phase.Failed, "JobDeleted", message, now or _now(), jobName=jname)


def blocked_status(
    qjob: dict[str, Any], reason: str, message: str, now: str | None = None
) -> dict[str, Any]:
    """The status of a generation whose Job cannot be created for now (its name held by a
    Job kquant did not create, a quota, an admission refusal): phase Pending, Ready False,
    Stalled True (it needs someone's action; the operator keeps retrying)."""
    qjob = to_plain(qjob)
    return _status(qjob, Phase.Pending, reason, message, now or _now(), stalled=True)


def pending_status(
    qjob: dict[str, Any], reason: str, message: str, now: str | None = None
) -> dict[str, Any]:
    """Phase Pending, Reconciling True: the operator waits on something that passes by
    itself (the collector removing a deleted object's Job)."""
    return _status(to_plain(qjob), Phase.Pending, reason, message, now or _now())


def job_existed(qjob: dict[str, Any], jname: str) -> bool:
    """Whether the status says the Job ``jname`` of the current generation existed (it
    names it with its uid, recorded right after the create, or with a start time): a create
    that succeeds now means it is gone. Before the uid, a Job created and removed while
    the operator was down, before any status recorded its start, was created again: the
    generation ran twice (operator fault-injection trial)."""
    status = qjob.get("status") or {}
    return (
        status.get("observedGeneration") == _meta(qjob)[1]
        and status.get("jobName") == jname
        and bool(status.get("jobUid") or status.get("startTime"))
    )


def invalid_spec_status(
    qjob: dict[str, Any], message: str, now: str | None = None
) -> dict[str, Any]:
    """The status of a spec rejected before any Job exists: phase Failed, reason InvalidSpec,
    Stalled True (only a spec change can help)."""
    qjob = to_plain(qjob)
    return _status(qjob, Phase.Failed, Reason.InvalidSpec.value, message, now or _now())


def derive_status(
    qjob: dict[str, Any],
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    now: str | None = None,
) -> dict[str, Any]:
    """The QuantizationJob ``status`` for the current state of its Job and pods.

    ``qjob``, ``job`` and ``pods`` are objects as the API server returns them; a Job of
    another generation (label ``kquant.io/generation``) counts as no Job, and pods are
    filtered to the Job's own. ``now`` (RFC 3339) stamps changed conditions; default: the
    current UTC time. Returns the status as a camelCase dict without null fields,
    validated through :class:`kquant_api.QuantizationJobStatus`.
    """
    qjob, now = to_plain(qjob), now or _now()
    name, generation = _meta(qjob)
    expected = job_name(name, generation) if name and generation else None
    if job is not None:
        labels = (job.get("metadata") or {}).get("labels") or {}
        if generation is not None and labels.get(LABEL_GENERATION) != str(generation):
            job = None
    if job is None:
        if is_finished(qjob):  # the Job was removed after finishing (TTL): keep the verdict
            return QuantizationJobStatus.model_validate(qjob["status"]).model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
        msg = f"waiting for Job {expected} to be created" if expected else "waiting for the Job"
        return _status(qjob, Phase.Pending, "JobPending", msg, now, jobName=expected)

    job = to_plain(job)
    jname = job["metadata"]["name"]
    spec, st = job.get("spec") or {}, job.get("status") or {}
    times = {
        "jobName": jname,
        "jobUid": job["metadata"].get("uid"),
        "startTime": st.get("startTime"),
    }
    true = {c.get("type"): c for c in st.get("conditions") or [] if c.get("status") == "True"}
    pods = [p for p in map(to_plain, pods) if belongs(p, job, name, generation)]
    last = latest_terminated(pods)

    done = true.get("Complete") or true.get("SuccessCriteriaMet")
    failed = true.get("Failed") or true.get("FailureTarget")
    result = last.result if last else None
    # A worker that wrote a Succeeded result had published its set (manifest last) and
    # promoted it: a deadline that then cut its exit short changes none of that.
    published = bool(failed and result and result.phase == Phase.Succeeded.value)
    if done and result is None:
        # exit 0 but no readable result: whether it validated, and what it published, is
        # unknown; GitOps must not take it for a validated model
        tail = log_tail(last.message) if last else ""
        message = (
            f"Job {jname} completed, but its worker left no result in its termination "
            "message" + (f" (it holds: {tail})" if tail else "") + ": whether it validated "
            "and what it published are unknown (see the pod's log and the output's report.json)"
        )
        finished = st.get("completionTime") or done.get("lastTransitionTime")
        return _status(qjob, Phase.Failed, "NoResult", message, now, completionTime=finished,
                       **times)  # fmt: skip
    if (done and not (result and result.phase == Phase.Failed.value)) or published:
        reason = result.reason.value if result else "Completed"
        message = (result.message if result else "") or f"Job {jname} completed"
        if published and failed:
            why = failed.get("reason") or "Failed"
            message += f" (the run had finished and published when the Job failed: {why})"
        finished = st.get("completionTime") or (done or failed or {}).get("lastTransitionTime")
        extra = {"result": _result_status(result)} if result else {}
        return _status(
            qjob, Phase.Succeeded, reason, message, now, completionTime=finished, **times, **extra
        )
    if done or failed:
        reason, message = _failure(failed or {}, last)
        finished = st.get("completionTime") or (failed or done).get("lastTransitionTime")
        extra = {"result": _result_status(last.result)} if last and last.result else {}
        return _status(
            qjob, Phase.Failed, reason, message, now, completionTime=finished, **times, **extra
        )
    if spec.get("suspend") or "Suspended" in true:
        queue = (job["metadata"].get("labels") or {}).get(LABEL_QUEUE)
        where = f" in queue {queue}" if queue else ""
        msg = f"Job {jname} is suspended, waiting for admission{where}"
        return _status(qjob, Phase.Pending, "Queued", msg, now, **times)
    if any(is_running(p) for p in pods) or st.get("ready"):
        return _status(qjob, Phase.Running, "Running", f"Job {jname} is running", now, **times)
    pending = pending_reason(pods)
    if pending:
        return _status(qjob, Phase.Pending, pending[0], pending[1], now, **times)
    if st.get("active"):
        return _status(qjob, Phase.Running, "Running", f"Job {jname} is running", now, **times)
    if st.get("failed"):
        msg = f"Job {jname}: {st['failed']} attempt(s) failed, retrying"
        if last and last.result:
            msg += f" (last: {last.result.reason.value}: {last.result.message})"
        return _status(qjob, Phase.Running, "Retrying", msg, now, **times)
    msg = f"Job {jname} created, waiting for its pod"
    return _status(qjob, Phase.Pending, "JobPending", msg, now, **times)


def _failure(cond: dict[str, Any], last: Terminated | None) -> tuple[str, str]:
    """(reason, message) of a failed Job. The worker's own reason (SourceNotFound,
    ValidationFailed...) wins over the Job controller's PodFailurePolicy or
    BackoffLimitExceeded; DeadlineExceeded wins over a worker's failure, whose run it cut
    short (a worker that had succeeded is a success: see derive_status)."""
    job_reason = cond.get("reason") or "Failed"
    job_message = cond.get("message") or "the Job failed"
    result = last.result if last else None
    if job_reason == "DeadlineExceeded":
        if result:
            return job_reason, f"{job_message} (worker: {result.reason.value}: {result.message})"
        return job_reason, job_message
    if result:
        return result.reason.value, result.message or job_message
    if last is None:
        return job_reason, job_message
    where = f"worker container in pod {last.pod} terminated: {last.reason or 'Error'}"
    where += f" (exit code {last.exit_code})" if last.exit_code is not None else ""
    tail = log_tail(last.message)
    message = f"{job_message}; {where}" + (f"; last output: {tail}" if tail else "")
    return ("OOMKilled" if last.reason == "OOMKilled" else job_reason), message


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning ``old`` into ``new``: status fields that ``new`` lacks
    (a previous generation's ``result``, ``completionTime``...) are set to null. Fields
    that are not part of the QuantizationJobStatus (kopf's own progress keys) are left
    alone."""
    patch = dict(new)
    for key in (old or {}).keys() - new.keys():
        if key in QuantizationJobStatus.model_fields:
            patch[key] = None
    return patch


def events_for(
    old_status: dict[str, Any] | None, new_status: dict[str, Any]
) -> list[tuple[str, str, str]]:
    """Kubernetes Events, as (type, reason, message), to emit on the change from
    ``old_status`` to ``new_status``: ``Succeeded`` (Normal) when a run validates,
    ``ValidationFailed`` (Warning) when it exceeds the tolerance, ``Failed`` (Warning,
    message starting with the reason) for any other failure. Nothing when the verdict for
    that generation was already written. (``JobCreated`` is emitted by the create handler.)
    """
    old = old_status or {}
    phase = new_status.get("phase")
    key = ("phase", "reason", "observedGeneration")
    if phase not in TERMINAL or all(old.get(k) == new_status.get(k) for k in key):
        return []
    reason = new_status.get("reason") or phase
    message = new_status.get("message") or ""
    if phase == Phase.Succeeded.value:
        event = ("Normal", "Succeeded", _summary(new_status) or message)
    elif reason == Reason.ValidationFailed.value:
        event = ("Warning", "ValidationFailed", message)
    else:
        event = ("Warning", "Failed", f"{reason}: {message}")
    kind, ereason, text = event
    if len(text) > _EVENT_MESSAGE_LIMIT:
        text = text[: _EVENT_MESSAGE_LIMIT - 3] + "..."
    return [(kind, ereason, text)]


def _summary(status: dict[str, Any]) -> str:
    """One line for the Succeeded event: sizes, reduction, worst error, promotion."""
    result = status.get("result") or {}
    parts = []
    if result.get("originalBytes") and result.get("quantizedBytes") is not None:
        parts.append(
            f"{result['originalBytes']} -> {result['quantizedBytes']} bytes "
            f"({result.get('reductionPercent', 0):.1f} % smaller)"
        )
    validation = result.get("validation") or {}
    if validation.get("maxAbsError") is not None:
        parts.append(f"max abs error {validation['maxAbsError']:.3g}")
    if result.get("promotedUri"):
        parts.append(f"promoted to {result['promotedUri']}")
    return "validated: " + ", ".join(parts) if parts else ""
