"""Kubernetes objects shaped as the API server returns them (kubectl get -o json, 1.31):
a QuantizationJob, its batch/v1 Job at each stage, and the worker pods the Job controller
creates, with the kubelet's container statuses and termination messages."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from kquant_operator.jobs import build_job
from kquant_operator.settings import OperatorSettings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "silero-vad-fp16.yaml"
CR_UID = "5d0f3e1a-8c3b-4c43-9a55-0e6c1b7f2a10"
JOB_UID = "b7e9c2d4-1f6a-4e8b-9d3c-2a5f7e1c9b04"
T0 = "2025-06-01T10:00:00Z"
T_START = "2025-06-01T10:00:02Z"
T_END = "2025-06-01T10:03:41Z"


def qjob(generation: int = 1, status: dict | None = None, **spec: Any) -> dict[str, Any]:
    """The example QuantizationJob with server-side metadata (uid, generation, ...)."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"].update(spec)
    doc["metadata"].update(
        uid=CR_UID,
        generation=generation,
        resourceVersion="48213",
        creationTimestamp=T0,
        managedFields=[{"manager": "kubectl-client-side-apply", "operation": "Update"}],
        annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"},
    )
    if status is not None:
        doc["status"] = status
    return doc


def job(cr: dict[str, Any], uid: str = JOB_UID, **status: Any) -> dict[str, Any]:
    """The Job built for ``cr`` after creation: server metadata and the given status."""
    manifest = build_job(cr, OperatorSettings())
    manifest["metadata"].update(
        uid=uid,
        resourceVersion="48220",
        generation=1,
        creationTimestamp=T0,
    )
    # Defaults and labels the API server and the Job controller add.
    manifest["metadata"]["labels"].update(
        {"batch.kubernetes.io/controller-uid": uid, "controller-uid": uid}
    )
    manifest["spec"].setdefault("suspend", False)
    manifest["spec"].update(
        completionMode="NonIndexed",
        completions=1,
        parallelism=1,
        manualSelector=False,
        podReplacementPolicy="Failed",
        selector={"matchLabels": {"batch.kubernetes.io/controller-uid": uid}},
    )
    manifest["status"] = status
    return manifest


def condition(ctype: str, reason: str, message: str, when: str = T_END) -> dict[str, Any]:
    """A Job condition with status True, as the Job controller writes it."""
    return {
        "type": ctype,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": when,
        "lastTransitionTime": when,
    }


def pod(
    job_obj: dict[str, Any],
    suffix: str = "x7k2p",
    phase: str = "Running",
    state: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A worker pod of ``job_obj`` with the worker container in ``state``."""
    jname = job_obj["metadata"]["name"]
    uid = job_obj["metadata"]["uid"]
    labels = copy.deepcopy(job_obj["spec"]["template"]["metadata"]["labels"])
    labels.update(
        {
            "batch.kubernetes.io/controller-uid": uid,
            "batch.kubernetes.io/job-name": jname,
            "controller-uid": uid,
            "job-name": jname,
        }
    )
    container = {
        "name": "worker",
        "image": "ghcr.io/kquant/kquant-job:0.1.0",
        "imageID": "",
        "ready": phase == "Running",
        "restartCount": 0,
        "started": phase == "Running",
        "state": state or {"running": {"startedAt": T_START}},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{jname}-{suffix}",
            "namespace": job_obj["metadata"].get("namespace", "default"),
            "uid": f"pod-{suffix}",
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": jname,
                    "uid": job_obj["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": copy.deepcopy(job_obj["spec"]["template"]["spec"]),
        "status": {
            "phase": phase,
            "conditions": conditions or [],
            "containerStatuses": [container],
            "startTime": T_START,
        },
    }


def terminated(
    exit_code: int, message: str, reason: str | None = None, finished: str = T_END
) -> dict[str, Any]:
    """The worker container's ``state`` after it exited."""
    return {
        "terminated": {
            "exitCode": exit_code,
            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "message": message,
            "startedAt": T_START,
            "finishedAt": finished,
            "containerID": "containerd://3f1c",
        }
    }
