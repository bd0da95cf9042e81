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
    Raises InvalidSpec naming the document and the field at fault; its ``rows`` detail (the
    table rows a failure carries, as the pipeline's) holds a ``spec`` row saying what was
    read and what was wrong with it (the table said "job  manifest" whatever was read:
    new-user trial).
    """
    if spec_env:
        text = os.environ.get(spec_env)
        if not text:
            what = f"environment variable {spec_env} is empty or unset"
            raise InvalidSpec(what, rows=_spec_row(f"nothing read: {what}"))
        origin = f"${spec_env}"
    else:
        origin = "<stdin>" if source == "-" else source
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidSpec(
                f"cannot read manifest {source}: {exc.strerror}",
                rows=_spec_row(f"nothing read: cannot read {source} ({exc.strerror})"),
            ) from None
        except UnicodeDecodeError as exc:  # a traceback and no result file before
            what = f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
            raise InvalidSpec(f"{origin}: {what}", rows=_spec_row(f"{origin}: {what}")) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidSpec(
            f"{origin}: not valid YAML/JSON: {exc}",
            rows=_spec_row(f"{origin}: not valid YAML/JSON{_where(exc)}"),
        ) from None
    jobs = [parse_job(d, f"{origin} document {i + 1}") for i, d in enumerate(docs) if _is_job(d)]
    if not jobs:
        raise InvalidSpec(
            f"{origin}: no {KIND} ({API_VERSION}) document found",
            rows=_spec_row(f"{origin}: no {KIND} document in it"),
        )
    return jobs


def _spec_row(what: str) -> list[tuple[str, str]]:
    """The table's ``spec`` row for a manifest that yields no job: what was read, what was
    wrong."""
    return [("spec", what)]


def _where(exc: yaml.YAMLError) -> str:
    """`` (line 4, column 5: expected ',' or '}', but got ':')``: where the parser gave up,
    and why; "" when it does not say."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None:
        return f" ({problem})" if problem else ""
    return f" (line {mark.line + 1}, column {mark.column + 1}" + (
        f": {problem})" if problem else ")"
    )


def _is_job(doc: Any) -> bool:
    return not (isinstance(doc, dict) and doc.get("kind") not in (None, KIND))


def parse_job(doc: Any, origin: str = "manifest") -> QuantizationJob:
    """Validate one document as a QuantizationJob. Raises InvalidSpec with the first error's
    field path (e.g. ``spec.quantization.keepIOTypes: Extra inputs are not permitted``)."""
    read = f"{origin}: not a valid {KIND}"
    if not isinstance(doc, dict):
        what = f"expected a mapping, got {type(doc).__name__}"
        raise InvalidSpec(f"{origin}: {what}", rows=_spec_row(f"{read} ({what})"))
    try:
        return QuantizationJob.model_validate(doc)
    except ValidationError as exc:
        raise InvalidSpec(
            f"{origin}: {format_validation_error(exc)}", rows=_spec_row(read)
        ) from None
