"""The Job-to-operator contract: failure reasons, exit codes and the compact result.

The worker writes one :class:`JobResult` as compact JSON (under 4 KiB, the kubelet's limit
for a termination message) to ``/dev/termination-log``; the operator reads it back into the
QuantizationJob status. Exit codes let a Job's ``podFailurePolicy`` fail at once on errors
that a retry cannot fix.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

MAX_RESULT_BYTES = 4096


class Reason(str, Enum):
    """Why a job ended; each belongs to one error class with its own exit code."""

    Validated = "Validated"
    Converted = "Converted"  # published without validation (spec.validation.enabled: false)
    # InvalidSpec class
    InvalidSpec = "InvalidSpec"
    # StorageError class
    SourceNotFound = "SourceNotFound"
    AccessDenied = "AccessDenied"
    OutputExists = "OutputExists"
    UnsafePath = "UnsafePath"
    SourceTooLarge = "SourceTooLarge"  # beyond what the work volume holds (nothing fetched)
    ForeignObject = "ForeignObject"  # a name kquant must write holds an object it did not write
    ConcurrentWrite = "ConcurrentWrite"  # another writer committed to the prefix first
    Superseded = "Superseded"  # a newer generation of this job already published there
    StorageRejected = "StorageRejected"  # the server refused the request as invalid (4xx)
    StorageUnavailable = "StorageUnavailable"
    # PassError class
    UnsupportedFormat = "UnsupportedFormat"
    CorruptModel = "CorruptModel"
    UnsafeModel = "UnsafeModel"  # a pickle that needs code execution to load (refused)
    ConversionFailed = "ConversionFailed"
    AlreadyQuantized = "AlreadyQuantized"  # INT8 of an INT8 model; FP16 or INT8 of an FP16 one
    ModelCrashed = "ModelCrashed"  # the sandboxed conversion process died of a signal
    MemoryLimitExceeded = "MemoryLimitExceeded"  # the sandbox's memory bound, or an OOM kill
    TimeLimitExceeded = "TimeLimitExceeded"  # the sandbox's time bound
    DiskLimitExceeded = "DiskLimitExceeded"  # the sandbox wrote past the work volume's room
    # ValidationFailed class
    ValidationFailed = "ValidationFailed"
    NoGain = "NoGain"  # within tolerance, but not smaller or slower than the original
    # the worker's own environment (a retry on another node may help)
    WorkDirUnusable = "WorkDirUnusable"  # the work directory cannot be created or written
    SandboxUnavailable = "SandboxUnavailable"  # model code cannot be confined as required
    # anything unexpected
    InternalError = "InternalError"


class ExitCode(int, Enum):
    """Process exit codes of ``kquant-job run``, one per error class.

    StorageUnavailable (an outage may pass) and the INTERNAL class (WorkDirUnusable and
    unexpected errors: another pod, on another node, may fare better) are retriable; the
    operator's podFailurePolicy fails the Job at once on every other non-zero code.
    """

    OK = 0
    INTERNAL = 1
    INVALID_SPEC = 10
    STORAGE = 20
    STORAGE_UNAVAILABLE = 21
    PASS = 30
    VALIDATION = 40


REASON_EXIT_CODE: dict[Reason, ExitCode] = {
    Reason.Validated: ExitCode.OK,
    Reason.Converted: ExitCode.OK,
    Reason.InvalidSpec: ExitCode.INVALID_SPEC,
    Reason.SourceNotFound: ExitCode.STORAGE,
    Reason.AccessDenied: ExitCode.STORAGE,
    Reason.OutputExists: ExitCode.STORAGE,
    Reason.UnsafePath: ExitCode.STORAGE,
    Reason.SourceTooLarge: ExitCode.STORAGE,
    Reason.ForeignObject: ExitCode.STORAGE,
    Reason.ConcurrentWrite: ExitCode.STORAGE,
    Reason.Superseded: ExitCode.STORAGE,
    Reason.StorageRejected: ExitCode.STORAGE,
    Reason.StorageUnavailable: ExitCode.STORAGE_UNAVAILABLE,
    Reason.UnsupportedFormat: ExitCode.PASS,
    Reason.CorruptModel: ExitCode.PASS,
    Reason.UnsafeModel: ExitCode.PASS,
    Reason.ConversionFailed: ExitCode.PASS,
    Reason.AlreadyQuantized: ExitCode.PASS,
    Reason.ModelCrashed: ExitCode.PASS,
    Reason.MemoryLimitExceeded: ExitCode.PASS,
    Reason.TimeLimitExceeded: ExitCode.PASS,
    Reason.DiskLimitExceeded: ExitCode.PASS,
    Reason.ValidationFailed: ExitCode.VALIDATION,
    Reason.NoGain: ExitCode.VALIDATION,
    Reason.WorkDirUnusable: ExitCode.INTERNAL,
    Reason.SandboxUnavailable: ExitCode.INTERNAL,
    Reason.InternalError: ExitCode.INTERNAL,
}

NON_RETRIABLE_EXIT_CODES: tuple[int, ...] = tuple(
    sorted(
        {
            int(c)
            for c in ExitCode
            if c not in (ExitCode.OK, ExitCode.INTERNAL, ExitCode.STORAGE_UNAVAILABLE)
        }
    )
)


class _Compact(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Artifact(_Compact):
    uri: str = Field(description="Where the artifact was published.")
    sha256: str = Field(description="Hex SHA-256 of the artifact bytes.")
    bytes: int = Field(ge=0, description="Size in bytes.")


class LatencyMs(_Compact):
    original: float = Field(description="Median latency of the original model, ms.")
    quantized: float = Field(description="Median latency of the converted model, ms.")
    runs: int | None = Field(
        None,
        description="Timed runs of each model (latencyRuns, or fewer when "
        "validation.latencyBudgetMs ran out).",
    )
    timing: str | None = Field(
        None,
        description="How the runs were timed: alternated (one run of each model in turn, "
        "so drift weighs on both alike; GPU, when absent) or sequential (the converted "
        "model's runs, then the original's: CPU, where onnxruntime's spinning threads "
        "would slow the other session, and a large model is not held twice).",
    )
    interleavedRatio: float | None = Field(
        None,
        description="The converted model's latency over the original's from blocks of "
        "runs of each model in turn (each block's 10th percentile, median over the "
        "blocks), measured on the CPU when the medians (of 10 runs or more) showed a "
        "slowdown of a model up to 64 MiB quick enough for the blocks to fit in a quarter of "
        "validation.latencyBudgetMs; it decides NoGain there, as drift between two "
        "sequential blocks moved a tiny model's medians by up to 1.5x.",
    )
    interleavedRuns: int | None = Field(
        None, description="Timed runs of each model in the interleaved blocks."
    )


class ValidationSummary(_Compact):
    passed: bool = Field(description="Whether every tolerance held.")
    samples: int = Field(
        description="Number of input samples compared (tensors compared, for kind tensors)."
    )
    kind: str | None = Field(
        None,
        description="What was compared: outputs of the models run on the samples (when "
        "absent); tensors (weights cast-checked one by one, for files that cannot run "
        "without their code: state dicts, safetensors); mixed (a directory with both).",
    )
    device: str = Field(description="Execution provider used, e.g. cuda or cpu.")
    maxAbsError: float | None = Field(None, description="Largest abs error over all outputs.")
    meanAbsError: float | None = Field(None, description="Largest per-output mean abs error.")
    cosineSimilarity: float | None = Field(None, description="Smallest per-output cosine.")
    latencyMs: LatencyMs | None = Field(None, description="Median latencies, ms.")
    inputs: str | None = Field(
        None,
        description="The validation inputs kquant chose when the spec gave none, e.g. "
        "'input [1, 576] speech (16 kHz clip); sr sample rate 16000'.",
    )


class VariantResult(_Compact):
    name: str = Field(description="The variant's name (its output names' suffix).")
    precision: str = Field(description="Its precision (fp16, bf16, int8).")
    passed: bool = Field(description="Converted, within tolerance and worth publishing.")
    reason: str = Field(description="Validated, Converted, or why it failed (a Reason).")
    message: str | None = Field(None, description="Why it failed, shortened.")
    quantizedBytes: int | None = Field(None, description="Size of its output, bytes.")
    latencyMs: LatencyMs | None = Field(None, description="Median latencies, ms.")
    cosineSimilarity: float | None = Field(None, description="Its worst-output cosine.")
    meanAbsError: float | None = Field(None, description="Its largest per-output mean abs error.")


class JobResult(_Compact):
    """Compact outcome of one worker run (the termination message)."""

    phase: str = Field(description="Succeeded or Failed.")
    reason: Reason = Field(description="Why the job ended.")
    message: str = Field("", description="Human-readable detail; never contains secrets.")
    precision: str | None = Field(None, description="Target precision.")
    originalBytes: int | None = Field(None, description="Size of the source model, bytes.")
    quantizedBytes: int | None = Field(None, description="Size of the converted model, bytes.")
    validation: ValidationSummary | None = Field(None, description="Validation summary.")
    artifacts: list[Artifact] = Field(default_factory=list, description="Published artifacts.")
    artifactsTruncated: int = Field(0, description="Artifacts left out to stay under 4 KiB.")
    reportUri: str | None = Field(None, description="Where report.json was written.")
    manifestUri: str | None = Field(None, description="Where manifest.json was written.")
    promotedUri: str | None = Field(None, description="Promotion prefix, when promoted.")
    notes: list[str] = Field(
        default_factory=list,
        description="Where the result departs from what was asked, or what to know about it: "
        "an INT8 fallback, an FP16 repair, a result slower or larger than the original.",
    )
    chosen: str | None = Field(
        None, description="spec.variants: the variant chosen (and promoted) by the objective."
    )
    variants: list[VariantResult] = Field(
        default_factory=list, description="spec.variants: every variant's outcome, compared."
    )
    # For a person's table only (per-model and per-output rows); never serialized.
    _rows: list[tuple[str, str]] = PrivateAttr(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The process exit code for this result's reason."""
        return int(REASON_EXIT_CODE[self.reason])

    def to_json(self) -> str:
        """Compact JSON, at most MAX_RESULT_BYTES bytes: the kubelet cuts a termination
        message there, and a cut one parsed as no result (NoResult for a promoted model:
        variants trial). Trimmed in this order until it fits (report.json has it all):
        variants' messages, notes, artifacts, variants' figures, the validation's figures,
        variants other than the chosen one, the message, then the URIs (report, manifest,
        promotion); what remains is phase, reason and a message of its start."""
        data: dict[str, Any] = self.model_dump(mode="json", exclude_none=True)
        for key in ("notes", "variants"):
            if not data.get(key):
                data.pop(key, None)
        text = _dumps(data)
        for trim in _TRIMS:
            if len(text) <= MAX_RESULT_BYTES:
                break
            text = trim(data)
        if len(text) > MAX_RESULT_BYTES:  # absurd URIs or names: the verdict still fits
            data = {k: data[k] for k in ("phase", "reason", "message")}
            data["message"] = data["message"][: MAX_RESULT_BYTES // 2]
            text = _dumps(data)
        return text


def _drop_variant_messages(data: dict[str, Any]) -> str:
    text = _dumps(data)
    for variant in data.get("variants", []):
        if len(text) <= MAX_RESULT_BYTES:
            break
        variant.pop("message", None)
        text = _dumps(data)
    return text


def _drop_notes(data: dict[str, Any]) -> str:
    text = _dumps(data)
    while len(text) > MAX_RESULT_BYTES and data.get("notes"):
        data["notes"].pop()
        text = _dumps(data)
    return text


def _drop_artifacts(data: dict[str, Any]) -> str:
    artifacts = data.get("artifacts") or []
    if len(artifacts) > MAX_ARTIFACTS_TRIED:  # each pop below serializes the whole result
        data["artifactsTruncated"] = len(artifacts) - MAX_ARTIFACTS_TRIED
        del artifacts[MAX_ARTIFACTS_TRIED:]
    text = _dumps(data)
    while len(text) > MAX_RESULT_BYTES and data.get("artifacts"):
        data["artifacts"].pop()
        data["artifactsTruncated"] = data.get("artifactsTruncated", 0) + 1
        text = _dumps(data)
    return text


def _drop_variant_figures(data: dict[str, Any]) -> str:
    for variant in data.get("variants", []):
        for key in ("latencyMs", "meanAbsError", "cosineSimilarity", "quantizedBytes"):
            variant.pop(key, None)
    return _dumps(data)


def _drop_validation_figures(data: dict[str, Any]) -> str:
    validation = data.get("validation")
    if validation:
        required = ("passed", "samples", "device", "kind")
        data["validation"] = {k: v for k, v in validation.items() if k in required}
    return _dumps(data)


def _drop_other_variants(data: dict[str, Any]) -> str:
    text = _dumps(data)
    variants = data.get("variants", [])
    while len(text) > MAX_RESULT_BYTES and len(variants) > 1:
        others = [i for i, v in enumerate(variants) if v.get("name") != data.get("chosen")]
        if not others:
            break
        del variants[others[-1]]
        text = _dumps(data)
    return text


def _cut_message(data: dict[str, Any]) -> str:
    excess = len(_dumps(data)) - MAX_RESULT_BYTES
    if excess > 0:
        data["message"] = data["message"][: max(0, len(data["message"]) - excess - 3)] + "..."
    return _dumps(data)


def _drop_uris(data: dict[str, Any]) -> str:
    text = _dumps(data)
    for key in ("reportUri", "manifestUri", "promotedUri"):
        if len(text) <= MAX_RESULT_BYTES:
            break
        data.pop(key, None)
        text = _dumps(data)
    return text


_TRIMS = (_drop_variant_messages, _drop_notes, _drop_artifacts, _drop_variant_figures,
          _drop_validation_figures, _drop_other_variants, _cut_message, _drop_uris)  # fmt: skip


# No artifact's JSON is shorter than 16 bytes: more never fit in MAX_RESULT_BYTES. Dropping
# them one at a time from 30 000 (a folder of side files) serialized the result 30 000 times:
# the worker spun for minutes after publishing, and the deadline killed it (trial).
MAX_ARTIFACTS_TRIED = MAX_RESULT_BYTES // 16


def _dumps(data: dict[str, Any]) -> str:
    # ASCII escapes make the byte length equal the character length.
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True)
