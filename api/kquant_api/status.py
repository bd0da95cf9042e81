"""The QuantizationJob status, written by the operator only (kstatus-compatible).

Conditions follow Kubernetes conventions (``metav1.Condition``) and kstatus: ``Ready`` is the
summary; ``Reconciling`` is True while the Job is queued or running; ``Stalled`` is True when
the resource cannot progress without a change (a failed run, an invalid spec). Each condition
carries the ``observedGeneration`` it was computed for, so GitOps tools (Argo CD, Flux) never
read a stale verdict as current.
"""

from __future__ import annotations

from enum import Enum

from pydantic import Field

from kquant_api.result import Artifact, ValidationSummary, VariantResult
from kquant_api.spec import _Model


class Phase(str, Enum):
    """Lifecycle phase of a QuantizationJob."""

    Pending = "Pending"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"


class ConditionStatus(str, Enum):
    """Kubernetes condition status."""

    true = "True"
    false = "False"
    unknown = "Unknown"


class ConditionType(str, Enum):
    """Condition types kquant writes (kstatus: Ready summary, Reconciling, Stalled)."""

    Ready = "Ready"
    Reconciling = "Reconciling"
    Stalled = "Stalled"


class Condition(_Model):
    type: ConditionType = Field(description="Condition type: Ready, Reconciling or Stalled.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="CamelCase reason, e.g. Validated, Queued, Running, SourceNotFound, "
        "ValidationFailed, DeadlineExceeded."
    )
    message: str = Field("", description="Human-readable detail.")
    lastTransitionTime: str | None = Field(
        None, description="RFC 3339 time the status last changed."
    )
    observedGeneration: int | None = Field(
        None, description="metadata.generation this condition was computed for."
    )


class ResultStatus(_Model):
    artifacts: list[Artifact] = Field(
        default_factory=list, description="Published artifacts (URI, sha256, bytes)."
    )
    artifactsTruncated: int = Field(0, description="Artifacts left out of the status.")
    precision: str | None = Field(
        None, description="Precision of the published conversion (the chosen variant's)."
    )
    originalBytes: int | None = Field(None, description="Size of the source model, bytes.")
    quantizedBytes: int | None = Field(None, description="Size of the converted model, bytes.")
    reductionPercent: float | None = Field(
        None, description="100 * (1 - quantizedBytes / originalBytes)."
    )
    validation: ValidationSummary | None = Field(None, description="Validation summary.")
    reportUri: str | None = Field(None, description="Where report.json was written.")
    manifestUri: str | None = Field(None, description="Where manifest.json was written.")
    promotedUri: str | None = Field(None, description="Promotion prefix, when promoted.")
    notes: list[str] = Field(
        default_factory=list,
        description="Where the result departs from what was asked (an INT8 fallback, an FP16 "
        "repair) or is worse than the original (slower, larger).",
    )
    chosen: str | None = Field(
        None, description="spec.variants: the variant chosen (and promoted) by the objective."
    )
    variants: list[VariantResult] = Field(
        default_factory=list, description="spec.variants: every variant's outcome, compared."
    )


class QuantizationJobStatus(_Model):
    phase: Phase | None = Field(None, description="Pending, Running, Succeeded or Failed.")
    reason: str | None = Field(
        None, description="Reason of the current phase (the worker's reason when finished)."
    )
    message: str = Field("", description="Human-readable detail of the current phase.")
    observedGeneration: int | None = Field(
        None, description="metadata.generation the status describes."
    )
    jobName: str | None = Field(None, description="The batch/v1 Job running this generation.")
    jobUid: str | None = Field(
        None,
        description="metadata.uid of that Job, recorded as soon as it is created: a Job of "
        "this generation existed, so a missing one is not created again.",
    )
    startTime: str | None = Field(None, description="When the Job started (RFC 3339).")
    completionTime: str | None = Field(None, description="When the Job finished (RFC 3339).")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Reconciling, Stalled."
    )
    result: ResultStatus | None = Field(None, description="Outcome of the finished run.")
