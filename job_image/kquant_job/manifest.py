"""Reading QuantizationJob manifests: the YAML that ``kubectl apply`` takes (several documents
run one after another) or JSON (stdin, or an environment variable set by the operator)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kquant_api import API_VERSION, KIND, QuantizationJob
from kquant_api.spec import format_validation_error
from kquant_job.errors import InvalidSpec


def load_jobs(source: str, *, spec_env: str | None = None) -> list[QuantizationJob]:
    """Parse every QuantizationJob in ``source``: a file path, or ``-`` for stdin; with
    ``spec_env`` the JSON is read from that environment variable instead.

    Documents of other kinds (e.g. a Secret beside the job in one file) are skipped.
    Raises InvalidSpec naming the document and the field at fault.
    """
    if spec_env:
        text = os.environ.get(spec_env)
        if not text:
            raise InvalidSpec(f"environment variable {spec_env} is empty or unset")
        origin = f"${spec_env}"
    elif source == "-":
        text, origin = sys.stdin.read(), "<stdin>"
    else:
        try:
            text, origin = Path(source).read_text(encoding="utf-8"), source
        except OSError as exc:
            raise InvalidSpec(f"cannot read manifest {source}: {exc.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidSpec(f"{origin}: not valid YAML/JSON: {exc}") from None
    jobs = [parse_job(d, f"{origin} document {i + 1}") for i, d in enumerate(docs) if _is_job(d)]
    if not jobs:
        raise InvalidSpec(f"{origin}: no {KIND} ({API_VERSION}) document found")
    return jobs


def _is_job(doc: Any) -> bool:
    return not (isinstance(doc, dict) and doc.get("kind") not in (None, KIND))


def parse_job(doc: Any, origin: str = "manifest") -> QuantizationJob:
    """Validate one document as a QuantizationJob. Raises InvalidSpec with the first error's
    field path (e.g. ``spec.quantization.keepIOTypes: Extra inputs are not permitted``)."""
    if not isinstance(doc, dict):
        raise InvalidSpec(f"{origin}: expected a mapping, got {type(doc).__name__}")
    try:
        return QuantizationJob.model_validate(doc)
    except ValidationError as exc:
        raise InvalidSpec(f"{origin}: {format_validation_error(exc)}") from None
