"""QuantizationJob -> batch/v1 Job: a pure function, no cluster access.

The Job runs ``kquant-job run --spec-env KQUANT_JOB`` with the validated QuantizationJob as
JSON in ``KQUANT_JOB`` (see DESIGN.md, "Operator to Job"). Credentials reach the pod only
through ``secretKeyRef``; the pod meets the Kubernetes "restricted" Pod Security Standard
(https://kubernetes.io/docs/concepts/security/pod-security-standards/).

The manifest carries its own ownerReference, labels and namespace: the handler creates it as
is (``kopf.adopt`` would also copy the CR's labels, e.g. an Argo CD tracking label).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from kquant_api import API_VERSION, KIND, NON_RETRIABLE_EXIT_CODES, QuantizationJob
from kquant_api.spec import ObjectMeta, format_validation_error
from kquant_operator.images import image_matches, parse_image, parse_pattern, same_image
from kquant_operator.settings import (
    DNS_SUBDOMAIN,
    OperatorSettings,
    normalize_resources,
    quantity,
    quantity_bytes,
)

WORKER_CONTAINER = "worker"
SPEC_ENV = "KQUANT_JOB"
# The largest spec a Job is made for (bytes of compact JSON): kopf stores the last handled
# spec in an annotation, and the API server caps a resource's annotations at 256 KiB in all
# (operator trial: a 326 KiB spec's annotation was refused, and its next change was taken
# for a create, leaving the older generation's Job running). kubectl's client-side apply
# (Argo CD's default) keeps the whole object in another annotation: two copies of the spec
# and room for labels and other annotations (a 128 KiB limit came out 400 bytes over).
MAX_SPEC_BYTES = 96 * 1024
WORK_DIR = "/work"
TERMINATION_LOG = "/dev/termination-log"
RUN_AS = 10001  # the uid/gid of the worker image's user

LABEL_NAME = "kquant.io/name"
LABEL_GENERATION = "kquant.io/generation"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
COMMON_LABELS = {
    "app.kubernetes.io/name": "kquant",
    "app.kubernetes.io/component": "worker",
    "app.kubernetes.io/managed-by": "kquant-operator",
}
_MAX_LABEL = 63
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class InvalidQuantizationJob(ValueError):
    """The QuantizationJob cannot become a Job; the message names the field at fault.

    A retry cannot fix it: the handler reports it as ``kopf.PermanentError`` and writes
    :func:`kquant_operator.status.invalid_spec_status`.
    """


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def job_name(name: str, generation: int) -> str:
    """The Job name for one generation of a QuantizationJob: ``<name>-<generation>``.

    A DNS-1123 label of at most 63 characters, because the Job controller copies it into
    the pods' ``batch.kubernetes.io/job-name`` label. A longer name, or one that is not a
    label (CR names may contain dots), is cut and made unique with 8 hex digits of the
    SHA-256 of the full name: ``<cut name>-<hash>-<generation>``.
    Raises ValueError for an empty name or a generation below 1.
    """
    if not name:
        raise ValueError("metadata.name: must not be empty")
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise ValueError(f"metadata.generation: expected an integer >= 1, got {generation!r}")
    plain = f"{name}-{generation}"
    if len(plain) <= _MAX_LABEL and _DNS_LABEL.match(plain):
        return plain
    suffix = f"-{_short_hash(name)}-{generation}"
    cut = re.sub(r"[^a-z0-9-]", "-", name.lower())[: _MAX_LABEL - len(suffix)].strip("-")
    return f"{cut}{suffix}" if cut else suffix[1:]


def label_value(value: str) -> str:
    """``value`` as a valid label value (at most 63 characters): long values are cut and end
    in 8 hex digits of their SHA-256, so two long names never share a label."""
    if len(value) <= _MAX_LABEL:
        return value
    return f"{value[: _MAX_LABEL - 9].rstrip('-._')}-{_short_hash(value)}"


def job_labels(name: str, generation: int) -> dict[str, str]:
    """Labels of the Job and its pods for one generation of the QuantizationJob ``name``."""
    value = label_value(name)
    return {
        **COMMON_LABELS,
        "app.kubernetes.io/instance": value,
        LABEL_NAME: value,
        LABEL_GENERATION: str(generation),
    }


def sandbox_timeout(deadline_seconds: int) -> int:
    """Seconds the worker gives its sandboxed model stage: 90 % of the Job's deadline (the
    rest: fetching, publishing), at least 60."""
    return max(60, int(deadline_seconds * 0.9))


def to_plain(obj: Any) -> Any:
    """A deep copy made of plain dicts and lists (kopf hands over Mapping views). Objects
    parsed from the API's JSON copy through the C JSON codec (a Python walk cost 0.5 ms an
    object, most of the operator's CPU under a burst: bench_reconcile --profile)."""
    if type(obj) in (dict, list):
        try:
            return json.loads(json.dumps(obj))
        except (TypeError, ValueError):  # not JSON: views or other objects inside
            pass
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def parse_qjob(qjob: Mapping[str, Any]) -> QuantizationJob:
    """Validate a QuantizationJob object as the API server returns it.

    Raises InvalidQuantizationJob naming the field (e.g. ``spec.quantization.keepIOTypes:
    Extra inputs are not permitted``).
    """
    try:
        return QuantizationJob.model_validate(to_plain(qjob))
    except ValidationError as exc:
        raise InvalidQuantizationJob(format_validation_error(exc)) from None


def _or(value: Any, default: Any) -> Any:
    # Empty strings count as unset (``image: ""`` in a manifest means "the default").
    return default if value is None or value == "" else value


def _check_allowed(image: str, account: str | None, settings: OperatorSettings) -> None:
    """Raise InvalidQuantizationJob for an image or a ServiceAccount the operator's
    settings do not allow. Whoever may create a QuantizationJob gets a pod run for it, in
    its namespace: any image, as any ServiceAccount there, would make that right the right
    to run any code with any identity of the namespace. Allowed: the worker image, images
    matching KQUANT_ALLOWED_IMAGES part by part (:mod:`kquant_operator.images`: a ``*``
    never crosses a ``/``), ServiceAccounts matching KQUANT_ALLOWED_SERVICE_ACCOUNTS
    (fnmatch patterns, case-sensitive)."""
    try:
        ref = parse_image(image)
    except ValueError as exc:
        message = f"spec.image: {image!r} is not an image reference: {exc}"
        raise InvalidQuantizationJob(message) from None
    if not same_image(ref, parse_image(settings.worker_image)) and not any(
        image_matches(ref, parse_pattern(p)) for p in settings.allowed_images
    ):
        raise InvalidQuantizationJob(
            f"spec.image: {image!r} is not an image this operator runs: the worker image "
            f"{settings.worker_image!r}, or one matching KQUANT_ALLOWED_IMAGES (chart value "
            f"worker.allowedImages: {list(settings.allowed_images)})"
        )
    if account and not DNS_SUBDOMAIN.fullmatch(account):
        raise InvalidQuantizationJob(
            f"spec.serviceAccountName: {account!r} is not a ServiceAccount name (lower-case "
            "RFC 1123 subdomain)"
        )
    if account and not _matches_any(account, settings.allowed_service_accounts):
        raise InvalidQuantizationJob(
            f"spec.serviceAccountName: {account!r} is not a ServiceAccount this operator runs "
            "worker pods as: it must match KQUANT_ALLOWED_SERVICE_ACCOUNTS (chart value "
            f"worker.allowedServiceAccounts: {list(settings.allowed_service_accounts)})"
        )


def _matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``name`` matches one of the fnmatch ``patterns`` (case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_priority(name: str | None, settings: OperatorSettings) -> None:
    """Raise InvalidQuantizationJob for a priorityClassName the settings do not allow: the
    default one (KQUANT_DEFAULT_PRIORITY_CLASS_NAME) or one matching
    KQUANT_ALLOWED_PRIORITY_CLASSES. A high class lets the worker pod preempt other
    tenants' pods, which whoever may create only QuantizationJobs could not do (operator
    trial)."""
    if not name or name == settings.default_priority_class_name:
        return
    if not _matches_any(name, settings.allowed_priority_classes):
        raise InvalidQuantizationJob(
            f"spec.priorityClassName: {name!r} is not a PriorityClass this operator runs "
            "worker pods with: the default "
            f"{settings.default_priority_class_name or '(none)'!r}, or one matching "
            "KQUANT_ALLOWED_PRIORITY_CLASSES (chart value worker.allowedPriorityClasses: "
            f"{list(settings.allowed_priority_classes)})"
        )


def build_job(qjob: Mapping[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    """The batch/v1 Job manifest (a plain dict) that runs one generation of ``qjob``.

    ``qjob`` is the QuantizationJob as read from the API server: ``metadata.name``,
    ``metadata.uid`` and ``metadata.generation`` are required. The same input always gives
    an equal dict. Raises InvalidQuantizationJob for a spec the worker would reject or a
    malformed ``spec.resources``; ValueError when the metadata lacks name, uid or generation.
    """
    raw_meta = qjob.get("metadata") or {}
    name, uid, generation = raw_meta.get("name"), raw_meta.get("uid"), raw_meta.get("generation")
    if not uid:
        raise ValueError("metadata.uid: required for the Job's ownerReference")
    jname = job_name(name or "", generation)
    model = parse_qjob(qjob)
    spec = model.spec
    namespace = raw_meta.get("namespace")

    try:
        resources = normalize_resources(
            _or(spec.resources, settings.default_resources), "spec.resources"
        )
        work_size = quantity(
            resources.get("limits", {}).get("ephemeral-storage", settings.work_volume_size),
            "spec.resources.limits.ephemeral-storage",
        )
        work_bytes = quantity_bytes(work_size, "spec.resources.limits.ephemeral-storage")
    except ValueError as exc:
        raise InvalidQuantizationJob(str(exc)) from None
    queue = _or(spec.queueName, settings.default_queue_name)
    labels = job_labels(name, generation)

    # The worker gets the validated spec as the user wrote it (unset fields stay unset, so a
    # newer operator's defaults never reach an older worker) plus the identifying metadata.
    payload = QuantizationJob(
        apiVersion=API_VERSION,
        kind=KIND,
        metadata=ObjectMeta(name=name, namespace=namespace, generation=generation, uid=uid),
        spec=spec,
    ).model_dump(mode="json", by_alias=True, exclude_none=True, exclude_unset=True)
    deadline = _or(spec.activeDeadlineSeconds, settings.active_deadline_seconds)
    spec_json = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    if len(spec_json.encode()) > MAX_SPEC_BYTES:
        raise InvalidQuantizationJob(
            f"spec: {len(spec_json.encode())} bytes, more than the "
            f"{MAX_SPEC_BYTES} bytes ({MAX_SPEC_BYTES // 1024} KiB) a QuantizationJob may "
            "hold (kopf keeps the spec in an annotation, and kubectl apply another, which the "
            "API server limits to 256 KiB in all; without it a spec "
            "change ran as a second create): name op types, or fewer nodes, in the lists"
        )
    env: list[dict[str, Any]] = [
        {"name": SPEC_ENV, "value": spec_json},
        {"name": "KQUANT_WORK_DIR", "value": WORK_DIR},
        # the emptyDir's sizeLimit, which statvfs does not show: the worker bounds its
        # downloads by it (kquant_job.budget)
        {"name": "KQUANT_WORK_BYTES", "value": str(work_bytes)},
        # the model stage stops itself before the Job's deadline kills the pod, so the
        # failure still gets its reason and report (TimeLimitExceeded)
        {"name": "KQUANT_SANDBOX_TIMEOUT_SECONDS", "value": str(sandbox_timeout(deadline))},
    ]
    # the cluster's S3 transfer tuning (a MinIO or Ceph may want other part sizes than S3)
    env += [{"name": k, "value": v} for k, v in sorted(settings.worker_s3_transfer.items())]
    if spec.storage and spec.storage.secretRef:
        secret = spec.storage.secretRef.name
        for key, optional in (
            ("AWS_ACCESS_KEY_ID", False),
            ("AWS_SECRET_ACCESS_KEY", False),
            ("AWS_SESSION_TOKEN", True),
        ):
            ref: dict[str, Any] = {"name": secret, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})

    image = _or(spec.image, settings.worker_image)
    _check_allowed(image, spec.serviceAccountName, settings)
    _check_priority(spec.priorityClassName, settings)
    container = {
        "name": WORKER_CONTAINER,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["kquant-job"],
        "args": ["run", "--spec-env", SPEC_ENV],
        "env": env,
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "work", "mountPath": WORK_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "work", "emptyDir": {"sizeLimit": work_size}},
            {"name": "tmp", "emptyDir": {"sizeLimit": settings.tmp_volume_size}},
        ],
    }
    if settings.image_pull_secrets:  # a private registry: Secrets in the CR's namespace
        pod_spec["imagePullSecrets"] = [{"name": n} for n in settings.image_pull_secrets]
    if spec.serviceAccountName:
        pod_spec["serviceAccountName"] = spec.serviceAccountName
    else:
        pod_spec["automountServiceAccountToken"] = False
    node_selector = _or(spec.nodeSelector, settings.default_node_selector)
    tolerations = _or(spec.tolerations, settings.default_tolerations)
    priority = _or(spec.priorityClassName, settings.default_priority_class_name)
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    if spec.affinity:
        pod_spec["affinity"] = spec.affinity
    if priority:
        pod_spec["priorityClassName"] = priority

    job_meta: dict[str, Any] = {
        "name": jname,
        "labels": {**labels, LABEL_QUEUE: queue} if queue else dict(labels),
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": name,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if namespace:
        job_meta["namespace"] = namespace
    job_spec: dict[str, Any] = {
        "backoffLimit": _or(spec.backoffLimit, settings.backoff_limit),
        "activeDeadlineSeconds": deadline,
        "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        "podFailurePolicy": {
            "rules": [
                # First: an evicted or preempted pod is never the worker's fault, whatever
                # exit code the interrupted worker reported; it does not count as a retry.
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": WORKER_CONTAINER,
                        "operator": "In",
                        "values": list(NON_RETRIABLE_EXIT_CODES),
                    },
                },
            ]
        },
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
    }
    if queue:
        # Kueue admits the Job by un-suspending it; created suspended so no pod starts first.
        job_spec["suspend"] = True
    manifest = {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta, "spec": job_spec}
    return copy.deepcopy(manifest)  # nothing shared with the settings or the input
