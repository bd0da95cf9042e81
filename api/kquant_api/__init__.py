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
)
from kquant_api.spec import (
    API_VERSION,
    DEFAULT_TOLERANCE,
    KIND,
    CalibrateMethod,
    Calibration,
    Int8Mode,
    ModelFormat,
    Precision,
    QuantFormat,
    QuantizationConfig,
    QuantizationJob,
    QuantizationJobSpec,
    QuantType,
    Tolerance,
    ValidationConfig,
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
    "ExitCode",
    "Int8Mode",
    "JobResult",
    "LatencyMs",
    "ModelFormat",
    "Precision",
    "QuantFormat",
    "QuantType",
    "QuantizationConfig",
    "QuantizationJob",
    "QuantizationJobSpec",
    "Reason",
    "Tolerance",
    "ValidationConfig",
    "ValidationSummary",
]
