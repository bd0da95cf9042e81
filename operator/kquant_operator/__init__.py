"""kquant's operator: QuantizationJob (kquant.io/v1alpha1) -> batch/v1 Job -> status.

Thin kopf handlers (:mod:`kquant_operator.handlers`, registered on import, so
``kopf run -m kquant_operator`` starts the operator) over two pure functions:

- :func:`kquant_operator.jobs.build_job` (QuantizationJob, settings) -> batch/v1 Job manifest;
- :func:`kquant_operator.status.derive_status` (QuantizationJob, Job, Pods) -> status.

Imports the shared API only: never torch, onnx or the worker.
"""

from kquant_operator import handlers  # registers the handlers with kopf on import

__all__ = ["handlers"]
