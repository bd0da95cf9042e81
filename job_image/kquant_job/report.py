"""report.json and manifest.json contents, and the tool versions they record."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from kquant_api import API_VERSION, QuantizationJob

_TOOLS = ("kquant", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "boto3", "torch")


def now() -> str:
    """Current UTC time, RFC 3339 (what Kubernetes uses for timestamps)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def tool_versions() -> dict[str, str]:
    """Installed versions of the tools that shape the output (absent ones omitted)."""
    versions = {"python": platform.python_version()}
    for dist in _TOOLS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def job_ref(job: QuantizationJob) -> dict[str, Any]:
    """The identifying metadata of the job (name, namespace, generation, uid)."""
    meta = job.metadata
    ref = {"name": meta.name, "namespace": meta.namespace, "generation": meta.generation}
    ref["uid"] = meta.uid
    return {k: v for k, v in ref.items() if v is not None}


def build_report(
    job: QuantizationJob,
    *,
    started: str,
    source: dict[str, Any],
    files: list[dict[str, Any]],
    models: list[dict[str, Any]],
    sizes: dict[str, Any],
    timings: dict[str, float],
    outcome: dict[str, Any],
    providers: list[str],
    sandbox: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The full record of a run, written as report.json next to the artifacts.

    ``files``: one entry per output file (path, action converted/copied, bytes);
    ``models``: per converted model, the pass details (block lists, attempts) and its
    validation metrics; ``sizes`` in bytes; ``timings`` in ms per stage; ``sandbox``: what
    confined the model code (Landlock ABI and rules, memory limit).
    """
    return {
        "apiVersion": API_VERSION,
        "kind": "QuantizationReport",
        "job": job_ref(job),
        "spec": job.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        "tolerance": job.spec.tolerance.model_dump(mode="json", exclude_none=True),
        "tools": tool_versions(),
        "executionProviders": providers,
        "source": source,
        "files": files,
        "models": models,
        "sizes": sizes,
        "timingsMs": timings,
        "startedAt": started,
        "finishedAt": now(),
        "outcome": outcome,
        "sandbox": sandbox or {},
    }


def manifest_fields(job: QuantizationJob, *, validation: dict[str, Any]) -> dict[str, Any]:
    """The manifest's own fields; publishing adds the layout, the set, the writer, the
    artifacts and the report (:func:`kquant_job.sets.layout.build_manifest`)."""
    return {
        "precision": job.spec.quantization.precision.value,
        "source": job.spec.model.uri,
        "createdAt": now(),
        "validation": validation,
    }


def failure_report(
    job: QuantizationJob,
    *,
    started: str,
    reason: str,
    message: str,
    timings: dict[str, float],
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """report.json for a run that ended before a validated set: what was asked, how far it
    got (``timingsMs`` per finished stage, ms), why it ended (``outcome``) and the error's
    structured ``detail`` (e.g. the conversion attempts)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "QuantizationReport",
        "job": job_ref(job),
        "spec": job.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        "tools": tool_versions(),
        "timingsMs": dict(timings),
        "startedAt": started,
        "finishedAt": now(),
        "outcome": {"phase": "Failed", "reason": reason, "message": message},
        "detail": detail or {},
    }
