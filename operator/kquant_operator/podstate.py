"""Reading a worker pod's state as the API server reports it (pure functions on plain dicts).

The worker writes its compact :class:`kquant_api.JobResult` JSON to ``/dev/termination-log``;
the kubelet copies it to ``status.containerStatuses[].state.terminated.message``. With
``terminationMessagePolicy: FallbackToLogsOnError`` a worker that died before writing it
(killed, out of memory) leaves the tail of its log there instead, which is not a result.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from pydantic import ValidationError

from kquant_api import JobResult
from kquant_operator.jobs import LABEL_GENERATION, LABEL_NAME, WORKER_CONTAINER, label_value

_JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")
# What looks like a credential in a log line (key=value, key: value, AWS access key ids).
_SECRET = re.compile(
    r"(?i)((?:secret|token|password|passwd|credential|api[_-]?key|access[_-]?key)[\w.-]*"
    r"[\"']?\s*[=:]\s*[\"']?)[^\s\"',;]+|\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"
)
# Container waiting reasons that explain why a pod does not start (kubelet's vocabulary).
_WAITING_REASONS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
)


class Terminated(NamedTuple):
    """The worker container's end in one pod: ``state.terminated`` and its parsed result."""

    pod: str
    exit_code: int | None
    reason: str  # kubelet's reason: Completed, Error, OOMKilled, ...
    finished_at: str
    message: str  # the raw termination message
    result: JobResult | None  # None when the message is not the worker's JSON


def belongs(pod: dict[str, Any], job: dict[str, Any], cr_name: str, generation: int | None) -> bool:
    """True when ``pod`` was created for ``job``. A Job read from the API server has a uid:
    then only its own pods count, owned by that uid or labelled with it (the Job
    controller's ``controller-uid`` labels); the pods of an earlier Job of the same name (a
    QuantizationJob deleted and re-created while the collector lags) or any pod carrying
    kquant's labels would otherwise pass for this run's. Without a uid (objects built by
    hand): labelled with the Job's name, or with this CR name and generation. Pods of
    another generation's Job are never taken."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    job_meta = job.get("metadata") or {}
    if labels.get(LABEL_GENERATION) not in (None, str(generation)):
        return False
    uid = job_meta.get("uid")
    if uid:
        owned = any(ref.get("uid") == uid for ref in meta.get("ownerReferences") or [])
        return owned or any(labels.get(k) == uid for k in _UID_LABELS)
    if any(labels.get(k) == job_meta.get("name") for k in _JOB_NAME_LABELS):
        return True
    return labels.get(LABEL_NAME) == label_value(cr_name) and LABEL_GENERATION in labels


def parse_result(message: str | None) -> JobResult | None:
    """The worker's JobResult from a termination message, or None when the message is
    something else (log lines from FallbackToLogsOnError, empty). One job per run, so the
    first line is the result when the whole message is not."""
    text = (message or "").strip()
    if not text.startswith("{"):
        return None
    for candidate in (text, text.splitlines()[0]):
        try:
            return JobResult.model_validate_json(candidate)
        except ValidationError:
            continue
    return None


def _worker_status(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == WORKER_CONTAINER:
            return cs
    return None


def latest_terminated(pods: list[dict[str, Any]]) -> Terminated | None:
    """The worker's most recent termination across ``pods`` (latest ``finishedAt``), so a
    retried Job reports its last attempt. None when no worker container has terminated."""
    found: list[Terminated] = []
    for pod in pods:
        cs = _worker_status(pod)
        term = ((cs or {}).get("state") or {}).get("terminated")
        if not term:
            continue
        message = term.get("message") or ""
        found.append(
            Terminated(
                pod=(pod.get("metadata") or {}).get("name", ""),
                exit_code=term.get("exitCode"),
                reason=term.get("reason") or "",
                finished_at=term.get("finishedAt") or "",
                message=message,
                result=parse_result(message),
            )
        )
    return max(found, key=lambda t: (t.finished_at, t.pod)) if found else None


def log_tail(message: str, limit: int = 300) -> str:
    """The last non-empty line of a non-JSON termination message, at most ``limit`` chars,
    with what looks like a credential (``SECRET_KEY=...``, ``token: ...``, an AWS access
    key id) replaced by ``***``: the line goes into the status and an Event, which more
    people read than the pod's log."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    last = _SECRET.sub(lambda m: (m.group(1) or "") + "***", lines[-1])
    return last if len(last) <= limit else "..." + last[-(limit - 3) :]


def is_running(pod: dict[str, Any]) -> bool:
    """True when the pod's phase is Running."""
    return (pod.get("status") or {}).get("phase") == "Running"


def pending_reason(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """Why a pending worker pod does not run, as (reason, message): a container waiting
    reason (ImagePullBackOff, CreateContainerConfigError for a missing Secret...), the
    scheduler's (Unschedulable, e.g. no node with a free GPU), else ("PodPending", ...).
    None when no pod is pending."""
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        status = pod.get("status") or {}
        if status.get("phase") != "Pending":
            continue
        name = (pod.get("metadata") or {}).get("name", "")
        waiting = ((_worker_status(pod) or {}).get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _WAITING_REASONS:
            return waiting["reason"], f"pod {name}: {waiting.get('message') or waiting['reason']}"
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                reason = cond.get("reason") or "Unschedulable"
                return reason, f"pod {name}: {cond.get('message') or 'not scheduled yet'}"
        return "PodPending", f"pod {name} is pending"
    return None
