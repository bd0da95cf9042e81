"""The GitOps health checks against the statuses the operator writes (derive_status on
API-shaped objects): the Argo CD Lua script run by a real Lua 5.1 interpreter (Argo CD's
gopher-lua implements 5.1), and the Flux healthCheckExprs run by cel-python."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from operator_objects import T_END, T_START, condition, job, pod, qjob, terminated

from kquant_api import JobResult, Reason, ValidationSummary
from kquant_operator.status import derive_status, invalid_spec_status

lua51 = pytest.importorskip("lupa.lua51")
celpy = pytest.importorskip("celpy")

ROOT = Path(__file__).resolve().parents[2]
LUA = (ROOT / "gitops" / "argocd-health.lua").read_text()
FLUX = yaml.safe_load((ROOT / "gitops" / "flux-kustomization.yaml").read_text())
NOW = "2025-06-01T10:05:00Z"


def _result(**update: Any) -> JobResult:
    base = JobResult(
        phase="Succeeded",
        reason=Reason.Validated,
        message="validated on 100 samples (cuda)",
        precision="fp16",
        originalBytes=2_327_524,
        quantizedBytes=1_286_255,
        validation=ValidationSummary(passed=True, samples=100, device="cuda", maxAbsError=8e-6),
        manifestUri="s3://models/silero-vad/v6-fp16/manifest.json",
        promotedUri="s3://models/silero-vad/production/",
    )
    return base.model_copy(update=update)


def _finished(cr: dict, result: JobResult, ctype: str, reason: str) -> dict:
    conditions = [condition(ctype, reason, "done")]
    if ctype == "Failed":
        conditions.insert(0, condition("FailureTarget", reason, "done"))
    j = job(cr, startTime=T_START, completionTime=T_END, conditions=conditions)
    phase = "Succeeded" if ctype == "Complete" else "Failed"
    return derive_status(
        cr, j, [pod(j, phase=phase, state=terminated(result.exit_code, result.to_json()))], NOW
    )


def with_status(cr: dict, status: dict | None) -> dict:
    out = copy.deepcopy(cr)
    if status is not None:
        out["status"] = status
    return out


def cases() -> dict[str, tuple[dict, str, str]]:
    """name -> (QuantizationJob with its status, Argo CD health, Flux status)."""
    cr = qjob()
    queued_cr = qjob(queueName="gpu-queue")
    suspended = job(queued_cr, conditions=[condition("Suspended", "JobSuspended", "suspended")])
    running = job(cr, active=1, ready=1, startTime=T_START)
    validated = _finished(cr, _result(), "Complete", "CompletionsReached")
    failed = _result(
        phase="Failed",
        reason=Reason.ValidationFailed,
        message="output stateN: cosine similarity 0.91 < 0.999",
        validation=ValidationSummary(passed=False, samples=100, device="cuda"),
        manifestUri=None,
        promotedUri=None,
    )
    not_found = _result(
        phase="Failed", reason=Reason.SourceNotFound, message="no such key", validation=None
    )
    new_generation = qjob(generation=2)
    return {
        "new": (cr, "Progressing", "InProgress"),
        "pending": (with_status(cr, derive_status(cr, None, [], NOW)), "Progressing", "InProgress"),
        "queued": (
            with_status(queued_cr, derive_status(queued_cr, suspended, [], NOW)),
            "Progressing",
            "InProgress",
        ),
        "running": (
            with_status(cr, derive_status(cr, running, [pod(running)], NOW)),
            "Progressing",
            "InProgress",
        ),
        "succeeded": (with_status(cr, validated), "Healthy", "Current"),
        "validation-failed": (
            with_status(cr, _finished(cr, failed, "Failed", "PodFailurePolicy")),
            "Degraded",
            "Failed",
        ),
        "stalled-source": (
            with_status(cr, _finished(cr, not_found, "Failed", "PodFailurePolicy")),
            "Degraded",
            "Failed",
        ),
        "stalled-invalid-spec": (
            with_status(cr, invalid_spec_status(cr, "spec.model.uri: bad scheme", NOW)),
            "Degraded",
            "Failed",
        ),
        # Git changed the spec (generation 2); the status still holds generation 1's verdict.
        "stale-generation": (with_status(new_generation, validated), "Progressing", "InProgress"),
    }


CASES = cases()


def argocd_health(obj: dict) -> dict:
    lua = lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    return dict(lua.execute(LUA))


def flux_status(obj: dict) -> str:
    """kustomize-controller's order: inProgress, then failed, then current; else InProgress.
    An expression that fails to evaluate (a missing field) keeps the object in progress."""
    (check,) = FLUX["spec"]["healthCheckExprs"]
    assert (check["apiVersion"], check["kind"]) == ("kquant.io/v1alpha1", "QuantizationJob")
    env = celpy.Environment()
    activation = celpy.json_to_cel(obj)
    for key, verdict in (
        ("inProgress", "InProgress"),
        ("failed", "Failed"),
        ("current", "Current"),
    ):
        program = env.program(env.compile(check[key]))
        value = program.evaluate(activation)
        if isinstance(value, celpy.CELEvalError):
            return "InProgress"
        if value:
            return verdict
    return "InProgress"


@pytest.mark.parametrize("name", list(CASES))
def test_argocd_health(name):
    obj, expected, _ = CASES[name]
    health = argocd_health(obj)
    assert health["status"] == expected, health
    assert health["message"]


@pytest.mark.parametrize("name", list(CASES))
def test_flux_health_check_exprs(name):
    obj, _, expected = CASES[name]
    assert flux_status(obj) == expected


def test_degraded_message_names_the_reason():
    obj = CASES["validation-failed"][0]
    assert argocd_health(obj)["message"].startswith("ValidationFailed: output stateN")


def test_argocd_configmap_carries_the_tested_script():
    cm = yaml.safe_load((ROOT / "gitops" / "argocd-cm.yaml").read_text())
    assert cm["data"]["resource.customizations.health.kquant.io_QuantizationJob"] == LUA
    kubernetes_validate.validate(cm, "1.31.0", strict=True)


def test_flux_kustomization_applies_the_worked_example():
    assert FLUX["kind"] == "Kustomization" and FLUX["spec"]["wait"] is True
    assert (ROOT / FLUX["spec"]["path"] / "silero-vad-production.yaml").is_file()
