"""kquant's shared API: the QuantizationJob spec and the worker's result contract.

Light on purpose: pydantic only, so that the worker, the operator and the CRD generator
can all import it.
"""

from kquant_api.result import (
    NON_RETRIABLE_EXIT_CODES,
    REASON_EXIT_CODE,
    Artifact,
    ExitCode,
    JobResult,
    LatencyMs,
    Reason,
    ValidationSummary,
    VariantResult,
)
from kquant_api.spec import (
    API_VERSION,
    DEFAULT_TOLERANCE,
    KIND,
    CalibrateMethod,
    Calibration,
    Int8Mode,
    ModelFormat,
    Objective,
    Precision,
    QuantFormat,
    QuantizationConfig,
    QuantizationJob,
    QuantizationJobSpec,
    QuantType,
    Tolerance,
    ValidationConfig,
)
from kquant_api.status import (
    Condition,
    ConditionStatus,
    ConditionType,
    Phase,
    QuantizationJobStatus,
    ResultStatus,
)

__all__ = [
    "API_VERSION",
    "DEFAULT_TOLERANCE",
    "KIND",
    "NON_RETRIABLE_EXIT_CODES",
    "REASON_EXIT_CODE",
    "Artifact",
    "CalibrateMethod",
    "Calibration",
    "Condition",
    "ConditionStatus",
    "ConditionType",
    "ExitCode",
    "Int8Mode",
    "JobResult",
    "LatencyMs",
    "ModelFormat",
    "Objective",
    "Phase",
    "Precision",
    "QuantFormat",
    "QuantType",
    "QuantizationConfig",
    "QuantizationJob",
    "QuantizationJobSpec",
    "QuantizationJobStatus",
    "Reason",
    "ResultStatus",
    "Tolerance",
    "ValidationConfig",
    "ValidationSummary",
    "VariantResult",
]
