"""Thin kopf handlers: QuantizationJob -> batch/v1 Job -> QuantizationJob status.

The decisions live in pure functions (:func:`~kquant_operator.jobs.build_job`,
:func:`~kquant_operator.status.derive_status`, :func:`~kquant_operator.status.events_for`);
these handlers only read and write the API:

- create/resume: build the Job of the CR's generation and create it under its
  deterministic name; an existing Job of that name (409 AlreadyExists, e.g. after an operator
  restart) is adopted, never duplicated. A generation that already has a final verdict gets
  no Job (its Job may be gone after ``ttlSecondsAfterFinished``).
- spec change (new generation), and create/resume of a generation past the first: delete
  the older generations' Jobs (propagation Background), valid new spec or not, then create
  the new one.
- Job events: read the owner CR and the Job's pods, write ``derive_status`` to the CR's
  status subresource (merge patch, guarded by ``resourceVersion``) and post its Events;
  only for the Job kquant names for the current generation and controls, and never over
  that generation's verdict.
- an invalid spec: status Failed/InvalidSpec, a Warning Event (Failed), ``kopf.PermanentError``;
  no Job.
- every ``KQUANT_RESYNC_SECONDS``: the status of each generation without a verdict derived
  again from its Job (an operator-wide loop, not a kopf timer, which would put a finalizer
  on every CR).

Deletion needs no handler and no finalizer: the Job's ownerReference (controller, uid) lets
Kubernetes' garbage collector remove the Job and its pods with the CR.

Start: ``kopf run -m kquant_operator --standalone --all-namespaces`` (or ``--namespace NS``
per namespace) ``--liveness=http://0.0.0.0:8080/healthz``; settings from ``KQUANT_*``
variables (:mod:`kquant_operator.settings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import datetime, timezone
from typing import Any, NoReturn

import kopf

from kquant_api import API_VERSION, KIND
from kquant_operator.jobs import (
    LABEL_GENERATION,
    LABEL_NAME,
    InvalidQuantizationJob,
    build_job,
    job_name,
    label_value,
    to_plain,
)
from kquant_operator.kube import ApiError, Kube, path
from kquant_operator.peers import standing_by
from kquant_operator.settings import OperatorSettings, resync_seconds
from kquant_operator.status import (
    TERMINAL,
    blocked_status,
    derive_status,
    events_for,
    invalid_spec_status,
    is_finished,
    job_existed,
    lost_status,
    pending_status,
    status_patch,
)

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "quantizationjobs"
RETRY_DELAY = 10.0  # seconds before kopf retries a handler after a transient API error
BLOCKED_DELAY = 60.0  # seconds between tries while a Job cannot be created (name taken, 403)
# A ResourceQuota's refusal (count/jobs.batch, quota.go: "exceeded quota: NAME, requested:
# ..."): Pending and Reconciling, not Stalled, as GitOps health reads Stalled as Degraded.
QUOTA_EXCEEDED = "exceeded quota"
STATUS_ATTEMPTS = 8  # event handlers are not retried by kopf: retry status writes inline
# How often a generation without a verdict has its status derived again from its Job
# (KQUANT_RESYNC_SECONDS): a status write that failed through a burst of API errors is
# otherwise never retried, as a finished Job sends no more events.
RESYNC_SECONDS = resync_seconds(os.environ)


def _qjob_path(namespace: str, name: str, sub: str = "") -> str:
    return path(GROUP, VERSION, PLURAL, namespace, name, sub)


def _qjobs_path(namespace: str | None) -> str:
    """The QuantizationJobs of ``namespace``, or of every namespace (None)."""
    if namespace is None:
        return f"/apis/{GROUP}/{VERSION}/{PLURAL}"
    return path(GROUP, VERSION, PLURAL, namespace)


def _jobs_path(namespace: str, name: str = "") -> str:
    return path("batch", "v1", "jobs", namespace, name)


def _raise_for(exc: ApiError, what: str) -> NoReturn:
    """Turn an API error into kopf's retry decision."""
    if exc.status == 409:  # a concurrent write: retry soon with a fresh object
        raise kopf.TemporaryError(f"{what}: {exc}", delay=1.0) from None
    if exc.transient:
        raise kopf.TemporaryError(f"{what}: {exc}", delay=RETRY_DELAY) from None
    raise kopf.PermanentError(f"{what}: {exc}") from None


async def configure(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Start-up: kopf's settings set explicitly, our settings and API client in memo, and
    the resync loop started (:func:`_resync_loop`).

    Progress and the diff base live in annotations (``kquant.io/...``), so ``status`` is
    ours alone. Events: only the explicit ones (JobCreated, Succeeded, ValidationFailed,
    Failed), not kopf's log lines. Peering is off unless ``--peering`` asks.
    """
    ours = OperatorSettings.from_env()  # a malformed variable stops the operator here
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kquant.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kquant.io", key="last-handled-configuration"
    )
    settings.posting.enabled = True
    settings.posting.loggers = False
    settings.posting.level = logging.INFO
    settings.posting.reporting_component = "kquant-operator"
    if not settings.peering.mandatory:  # ``kopf run --peering NAME`` makes it mandatory
        settings.peering.standalone = True
    settings.watching.server_timeout = 300  # renew watches every 5 minutes
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.watching.label_selectors["batch", "v1", "jobs"] = LABEL_NAME  # only our Jobs
    if ours.watch_namespaces:
        # Namespaced mode runs with namespaced RBAC: no cluster-wide listing of namespaces and
        # CRDs (kopf would retry the 403s for ~1 minute before serving the given namespaces).
        settings.scanning.disabled = True
    memo.settings = ours
    memo.peering = settings.peering  # filled from ``kopf run``'s flags before start-up
    memo.kube = Kube.from_environment()
    memo.resync = asyncio.create_task(_resync_loop(memo, logger))


async def close(memo: kopf.Memo, **_: Any) -> None:
    """Clean-up: stop the resync loop, release the API client's connections."""
    task = memo.get("resync")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    kube = memo.get("kube")
    if kube is not None:
        kube.close()


def in_scope(namespace: str | None, memo: kopf.Memo, **_: Any) -> bool:
    """Handle only the namespaces of ``KQUANT_WATCH_NAMESPACES`` (all when it is empty)."""
    ours: OperatorSettings | None = memo.get("settings")
    return ours is None or ours.cluster_wide or namespace in ours.watch_namespaces


async def _write_status(
    kube: Kube, qjob: dict[str, Any], new: dict[str, Any], direct_events: bool = False
) -> bool:
    """Merge-patch ``new`` into the CR's status unless it is already there; guarded by the
    CR's resourceVersion (409 Conflict when someone wrote in between). True if written.
    Its Events go through kopf's poster inside a handler, through our client
    (``direct_events``) from the resync loop, where kopf has no poster: there a verdict's
    Event was lost and the resync logged a failure after the status was written (trial)."""
    old = qjob.get("status") or {}
    patch = status_patch(old, new)
    if all(old.get(k) == v for k, v in patch.items()):
        return False
    meta = qjob["metadata"]
    body = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": patch}
    await kube.merge_patch(_qjob_path(meta["namespace"], meta["name"], "status"), body)
    for etype, reason, message in events_for(old, new):
        if direct_events:
            await _post_event(kube, qjob, etype, reason, message)
        else:
            kopf.event(qjob, type=etype, reason=reason, message=message)
    return True


async def _post_event(
    kube: Kube, qjob: dict[str, Any], etype: str, reason: str, message: str
) -> None:
    """POST a core/v1 Event about ``qjob``, as kopf posts its own (the operator's RBAC:
    events create). A refused one is logged: the status it reports is written already."""
    meta = qjob["metadata"]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "reason": reason,
        "message": message[:1024],  # the API server's limit on an Event's message
        "type": etype,
        "source": {"component": "kquant-operator"},
        "reportingComponent": "kquant-operator",
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        await kube.create(path("", "v1", "events", meta["namespace"]), body)
    except ApiError as exc:
        logging.getLogger("kquant").warning("Event %s on %s not posted: %s",
                                            reason, meta["name"], exc)  # fmt: skip


async def _create_or_adopt(
    kube: Kube, manifest: dict[str, Any], qjob: dict[str, Any]
) -> tuple[bool, dict[str, Any]]:
    """Create the Job; on 409 adopt the existing one if this CR owns it. Returns whether
    it was created, and the Job. A Job of that name that is not this CR's is never
    adopted: the status says whose it is, and the create is tried again later."""
    meta = manifest["metadata"]
    jname = meta["name"]
    try:
        return True, await kube.create(_jobs_path(meta["namespace"]), manifest)
    except ApiError as exc:
        if exc.status != 409:
            raise
    try:
        existing = await kube.get(_jobs_path(meta["namespace"], jname))
    except ApiError as exc:
        if exc.status == 404:  # deleted since the 409: create it on the next try
            raise kopf.TemporaryError(f"Job {jname} vanished", delay=1.0) from None
        raise
    owners = existing.get("metadata", {}).get("ownerReferences") or []
    if any(ref.get("uid") == qjob["metadata"]["uid"] for ref in owners):
        return False, existing
    other = next((r for r in owners if r.get("kind") == KIND
                  and r.get("apiVersion") == API_VERSION), None)  # fmt: skip
    if other is not None and not await _alive(kube, meta["namespace"], other):
        # A same-named CR was deleted and re-created: wait for the collector to remove its Job.
        message = f"waiting for Job {jname} of a deleted QuantizationJob of this name to be removed"
        await _set_status(kube, qjob, pending_status(qjob, "WaitingForOldJob", message))
        raise kopf.TemporaryError(f"Job {jname} of a previous object is being deleted", delay=5.0)
    owner = ", ".join(f"{r.get('kind')}/{r.get('name')}" for r in owners) or "no owner"
    message = (
        f"a Job named {jname} exists and was not created for this QuantizationJob ({owner}); "
        "kquant neither adopts nor deletes it: remove or rename it, and the run starts"
    )
    await _set_status(kube, qjob, blocked_status(qjob, "JobNameTaken", message))
    raise kopf.TemporaryError(f"Job {jname} exists and is not owned by this object",
                              delay=BLOCKED_DELAY)  # fmt: skip


async def _alive(kube: Kube, namespace: str, ref: dict[str, Any]) -> bool:
    """Whether the QuantizationJob an ownerReference names still exists (same uid). Two CRs
    whose Job names collide (a long or dotted name cut and hashed, ``jobs.job_name``) both
    live: the second is blocked (JobNameTaken), not left waiting for a deletion that never
    comes. Raises kopf's retry on other API errors."""
    if not ref.get("name"):
        return False
    try:
        current = await kube.get(_qjob_path(namespace, str(ref["name"])))
    except ApiError as exc:
        if exc.status == 404:
            return False
        _raise_for(exc, "reading the QuantizationJob that owns the Job")
    return (current.get("metadata") or {}).get("uid") == ref.get("uid")


async def _set_status(kube: Kube, qjob: dict[str, Any], status: dict[str, Any]) -> None:
    """Write ``status``; an API error becomes kopf's retry decision."""
    try:
        await _write_status(kube, qjob, status)
    except ApiError as exc:
        _raise_for(exc, "writing the status")


async def ensure_job(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Create (or adopt) the Job of the CR's current generation."""
    kube: Kube = memo.kube
    qjob = to_plain(body)
    meta = qjob["metadata"]
    if is_finished(qjob):
        logger.info("generation %s already finished: no Job", meta.get("generation"))
        return
    if int(meta.get("generation") or 1) > 1:  # a first generation has no older Job
        # First, whatever the new spec is: an invalid spec change left the previous
        # generation's Job running untracked, publishing and promoting (operator trial).
        await _delete_older(kube, qjob, logger)
    try:
        manifest = build_job(qjob, memo.settings)
    except InvalidQuantizationJob as exc:
        await _reject(kube, qjob, str(exc))
    manifest["metadata"]["namespace"] = meta["namespace"]
    jname = manifest["metadata"]["name"]
    if job_existed(qjob, jname) and not await _exists(kube, meta["namespace"], jname):
        # It ran (the status saw it start) and is gone: deleted, or removed by its TTL while
        # the operator was down. A new Job would run the conversion again.
        logger.warning("Job %s of generation %s is gone: not re-created", jname, meta["generation"])
        await _set_status(kube, qjob, lost_status(qjob, jname))
        return
    try:
        created, job = await _create_or_adopt(kube, manifest, qjob)
    except ApiError as exc:
        if exc.status in (400, 422):  # the API server rejected what the spec produced
            await _reject(kube, qjob, f"the API server rejected Job {jname}: {exc.message}")
        if exc.status == 403:
            message = f"the API server refused to create Job {jname}: {exc.message}"
            if QUOTA_EXCEEDED in exc.message:  # frees up as other Jobs finish: waiting
                status = pending_status(qjob, "QuotaExceeded", message)
            else:  # an admission plugin or RBAC: someone must act
                status = blocked_status(qjob, "JobForbidden", message)
            await _set_status(kube, qjob, status)
            raise kopf.TemporaryError(message, delay=BLOCKED_DELAY) from None
        _raise_for(exc, f"creating Job {jname}")
    if created:
        kopf.info(body, reason="JobCreated", message=f"created Job {jname}")
        logger.info("created Job %s", jname)
    else:
        logger.info("adopted existing Job %s", jname)
        owner = _owner(job)
        if owner is not None and _may_have_pods(job):
            # It ran while the operator was down: its status comes from its pods, as a Job
            # event's would (without them a finished Job read as NoResult).
            await _sync_status(kube, owner, job, False, logger)
            return
    try:  # the Job's uid, at once: a Job removed before its start is never created again
        await _write_status(kube, qjob, derive_status(qjob, job, []))  # no pods yet
    except ApiError as exc:  # its first event writes it too
        logger.info("status after the create not written: %s", exc)


async def _exists(kube: Kube, namespace: str, jname: str) -> bool:
    try:
        await kube.get(_jobs_path(namespace, jname))
        return True
    except ApiError as exc:
        if exc.status == 404:
            return False
        _raise_for(exc, f"reading Job {jname}")


async def _reject(kube: Kube, qjob: dict[str, Any], message: str) -> NoReturn:
    """Record an invalid spec (status; its Warning Event "Failed: InvalidSpec: ...") and
    stop retrying."""
    try:
        await _write_status(kube, qjob, invalid_spec_status(qjob, message))
    except ApiError as exc:
        _raise_for(exc, "writing the status")
    raise kopf.PermanentError(f"invalid spec: {message}")


async def replace_job(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """A new generation: delete the Jobs of older generations, then create its own
    (:func:`ensure_job` does both)."""
    await ensure_job(body=body, memo=memo, logger=logger)


async def _delete_older(kube: Kube, qjob: dict[str, Any], logger: kopf.Logger) -> None:
    """Delete the Jobs kquant created for older generations of ``qjob`` (controlled by it,
    under the name of the generation their label gives), before its current generation's
    Job is created: on resume after a spec change made while the operator was down, or when
    kopf saw the change as a create (a spec too large for its diff-base annotation), two
    generations ran at once. A Job someone copied from ours is left alone."""
    meta = qjob["metadata"]
    namespace, generation = meta["namespace"], str(meta["generation"])
    try:
        jobs = await kube.list(_jobs_path(namespace), f"{LABEL_NAME}={label_value(meta['name'])}")
        for job in jobs:
            jmeta = job["metadata"]
            labelled = (jmeta.get("labels") or {}).get(LABEL_GENERATION)
            if labelled == generation or not _ours(job, qjob, labelled):
                continue
            try:
                await kube.delete(_jobs_path(namespace, jmeta["name"]))
            except ApiError as exc:
                if exc.status != 404:
                    raise
            logger.info("deleted Job %s of an older generation", jmeta["name"])
    except ApiError as exc:
        _raise_for(exc, "deleting the previous generation's Job")


def _owner(job: kopf.Body) -> dict[str, Any] | None:
    """The QuantizationJob controlling ``job`` (its ownerReference with ``controller:
    true``, the one kquant writes), or None."""
    for ref in job.get("metadata", {}).get("ownerReferences") or []:
        if (ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION
                and ref.get("uid") and ref.get("controller") is True):  # fmt: skip
            return dict(ref)
    return None


def _ours(job: dict[str, Any], qjob: dict[str, Any], generation: Any) -> bool:
    """Whether ``job`` is the Job kquant creates for ``qjob``'s ``generation``: controlled
    by it (uid) and under the name kquant gives that generation. A copy of it (a hand
    re-run keeping its labels and ownerReference) is someone else's: it neither drives the
    status nor is deleted."""
    owner, meta = _owner(job), qjob.get("metadata") or {}
    try:
        expected = job_name(meta.get("name", ""), int(generation))
    except (TypeError, ValueError):
        return False
    return (owner is not None and owner["uid"] == meta.get("uid")
            and job.get("metadata", {}).get("name") == expected)  # fmt: skip


def _may_have_pods(job: dict[str, Any]) -> bool:
    """Whether the Job's status shows any pod (active, ready, terminating, succeeded,
    failed) or any condition: a Job just created has none, and its pods need no listing."""
    st = job.get("status") or {}
    counts = ("active", "ready", "terminating", "succeeded", "failed")
    return bool(st.get("conditions")) or any(st.get(k) for k in counts)


async def job_event(
    event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """A change of one of our Jobs: recompute and write the owner's status. A Job of the
    current generation deleted before its verdict was written (by a person; a finished
    Job's TTL comes after its verdict) ends the generation in JobDeleted. A Job that shows
    no pod and no condition yet is skipped (its status is ensure_job's; the resync loop
    writes it if that write failed)."""
    owner = _owner(body)
    if owner is None:
        return
    job = event.get("object") or to_plain(body)  # the raw object: no view to copy
    deleted = event.get("type") == "DELETED"
    if not deleted and not _may_have_pods(job):
        # Just created: ensure_job wrote the status this gives (Pending, the Job's uid) right
        # after the create; a GET of the CR here only raced that write (burst benchmark).
        return
    await _sync_status(memo.kube, owner, job, deleted, logger)


async def _resync_loop(memo: kopf.Memo, logger: kopf.Logger) -> None:
    """Every RESYNC_SECONDS, :func:`resync` each QuantizationJob in scope. Not a kopf timer:
    kopf puts a finalizer on every object a timer serves, and with it a CR could not be
    deleted while the operator is down or uninstalled (``kubectl delete`` and a namespace's
    deletion hung), and each CR cost two more PATCHes and a round trip before its Job.
    A round is skipped while kopf peering makes this replica stand by (:func:`_standing_by`)."""
    while True:
        await asyncio.sleep(RESYNC_SECONDS)  # read each time: tests shorten it
        try:
            if not await _standing_by(memo, logger):
                await resync(memo.kube, memo.settings, logger)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next round tries again
            logger.warning("resync failed: %s", exc)


async def _standing_by(memo: kopf.Memo, logger: kopf.Logger) -> bool:
    """Whether kopf peering pauses this replica (:mod:`kquant_operator.peers`), or its
    peering object cannot be read (then it cannot tell, and a standby must not write)."""
    peering = memo.peering
    if peering.standalone:
        return False
    namespaces = () if peering.clusterwide else memo.settings.watch_namespaces
    try:
        blocking = await standing_by(memo.kube, peering.name, peering.priority, namespaces)
    except ApiError as exc:
        logger.warning("resync skipped: cannot read peering %r: %s", peering.name, exc)
        return True
    if blocking:
        logger.debug("resync skipped: standing by for %s", ", ".join(blocking))
    return bool(blocking)


async def resync(kube: Kube, settings: OperatorSettings, logger: kopf.Logger) -> None:
    """For each QuantizationJob in scope whose generation has no verdict: read its Job and
    write the status it gives, as a Job event would. Before, a Job that finished while the
    API server refused the status writes (8 Conflicts in a row, 20 s of 503s) left the CR
    Running for good (fault-injection trial): a finished Job sends no more events. One LIST
    of QuantizationJobs per watched namespace (one in all when cluster-wide) and a GET of
    each unfinished one's Job."""
    namespaces: tuple[str | None, ...] = settings.watch_namespaces or (None,)
    for namespace in namespaces:
        try:
            qjobs = await kube.list(_qjobs_path(namespace))
        except ApiError as exc:
            where = f"in {namespace}" if namespace else "in all namespaces"
            logger.warning("cannot list QuantizationJobs %s: %s", where, exc)
            continue
        for qjob in qjobs:
            if not is_finished(qjob) and qjob.get("metadata", {}).get("generation"):
                try:  # one CR's trouble (a garbled answer, a bad status) skips no other
                    await _resync_one(kube, qjob, logger)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    name = qjob["metadata"].get("name")
                    logger.warning("resync of %s failed: %s", name, exc)


async def _resync_one(kube: Kube, qjob: dict[str, Any], logger: kopf.Logger) -> None:
    meta = qjob["metadata"]
    jname = job_name(meta["name"], meta["generation"])
    try:
        job = await kube.get(_jobs_path(meta["namespace"], jname))
    except ApiError as exc:
        # 404: not created yet (ensure_job's part), or gone (its DELETED event's)
        if exc.status != 404:
            logger.warning("cannot read Job %s: %s", jname, exc)
        return
    owner = _owner(job)
    if owner is not None and _ours(job, qjob, meta["generation"]):  # never someone else's
        await _sync_status(kube, owner, job, False, logger, direct_events=True)


async def _sync_status(
    kube: Kube,
    owner: dict[str, Any],
    job: dict[str, Any],
    deleted: bool,
    logger: kopf.Logger,
    direct_events: bool = False,
) -> None:
    """Write the status of ``owner`` (the Job's ownerReference) derived from ``job`` and
    its pods, retrying Conflicts and transient errors STATUS_ATTEMPTS times
    (``direct_events``: see :func:`_write_status`)."""
    namespace, jname = job["metadata"]["namespace"], job["metadata"]["name"]
    paused = False
    for attempt in range(STATUS_ATTEMPTS):
        try:
            if paused and not deleted:  # after a back-off the Job read before is stale
                try:
                    job = await kube.get(_jobs_path(namespace, jname))
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    deleted = True  # gone since: as its DELETED event says
            qjob = await kube.get(_qjob_path(namespace, owner["name"]))
            qmeta = qjob.get("metadata") or {}
            labels = job["metadata"].get("labels") or {}
            if qmeta.get("uid") != owner["uid"]:
                return  # the owner is gone (or was re-created): the collector takes the Job
            if labels.get(LABEL_GENERATION) != str(qmeta.get("generation")):
                return  # an older generation's Job, being replaced
            if not _ours(job, qjob, qmeta.get("generation")):
                return  # a copy of our Job under another name: not the generation's run
            if is_finished(qjob):
                # Its verdict is written and stays: a later event (its pod collected, the
                # TTL, a re-list after a restart) would derive NoResult from a Job whose pods
                # are gone, and a resync's read of a Job may predate a JobDeleted verdict.
                return
            pods = []
            if _may_have_pods(job):
                selector = ",".join(f"{k}={labels[k]}" for k in (LABEL_NAME, LABEL_GENERATION))
                pods = await kube.list(path("", "v1", "pods", namespace), selector)
            status = derive_status(qjob, job, pods)
            if deleted and status.get("phase") not in TERMINAL:
                status = lost_status(qjob, job["metadata"]["name"])
            await _write_status(kube, qjob, status, direct_events)
            return
        except ApiError as exc:
            if exc.status == 404:
                return  # the CR was deleted
            if exc.status != 409 and not exc.transient:
                logger.error("cannot write the status of %s: %s", owner["name"], exc)
                return
            if exc.status != 409:  # a conflict retries at once, with a fresh read
                await asyncio.sleep(min(0.2 * 2**attempt, RETRY_DELAY))
                paused = True
    logger.error("status of %s not written after %d attempts; tried again within %g s",
                 owner["name"], STATUS_ATTEMPTS, RESYNC_SECONDS)  # fmt: skip


def register(registry: kopf.OperatorRegistry) -> None:
    """Register every handler into ``registry`` (tests pass a fresh one per operator run)."""
    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(close)
    for cause in (kopf.on.create, kopf.on.resume):
        cause(GROUP, VERSION, PLURAL, when=in_scope, registry=registry)(ensure_job)
    kopf.on.update(GROUP, VERSION, PLURAL, field="spec", when=in_scope, registry=registry)(
        replace_job
    )
    kopf.on.event(
        "batch", "v1", "jobs", labels={LABEL_NAME: kopf.PRESENT}, when=in_scope, registry=registry
    )(job_event)


register(kopf.get_default_registry())  # ``kopf run -m kquant_operator`` finds them on import
