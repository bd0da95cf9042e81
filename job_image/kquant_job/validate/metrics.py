"""Per-output error metrics between an original and a converted model, and the tolerance check.

Float outputs: every sample's output is flattened and concatenated into one vector per model,
then compared in float64:

- ``maxAbsError`` = max |a - b|, ``meanAbsError`` = mean |a - b|,
- ``cosineSimilarity`` = a.b / (|a| |b|) (1.0 when both are all zeros, 0.0 when one is).

Concatenating first matters: a per-sample cosine of a 1-element output (a speech probability,
a logit) is always +-1 and says nothing; over the stream it measures whether the outputs move
together. float64 because the interesting cosines sit within 1e-5 of 1, below float32's
accumulated rounding over thousands of terms.

Values non-finite in either model are left out of those three numbers and counted instead
(NaN and Inf, per model). A non-finite value in the converted output where the original is
finite (``newNonFinite``) is always a violation, whatever the tolerance.

Integer and bool outputs (indices, token ids, masks) must match exactly: ``mismatches``
counts differing elements and any mismatch is a violation, since a changed index is a changed
decision, not a rounding error. A sample whose output shape differs counts in
``shapeMismatches`` (always a violation) and is left out of the other numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kquant_api import Tolerance
from kquant_job.errors import InvalidSpec
from kquant_job.validate.decisions import DecisionMetrics, decision_violations


@dataclass
class OutputMetrics:
    """Comparison of one output over all samples (see the module docstring)."""

    name: str
    exact: bool  # integer/bool output: compared by mismatch count
    elements: int = 0  # compared elements (all samples)
    maxAbsError: float | None = None
    meanAbsError: float | None = None
    cosineSimilarity: float | None = None
    mismatches: int = 0
    nanOriginal: int = 0
    infOriginal: int = 0
    nanConverted: int = 0
    infConverted: int = 0
    newNonFinite: int = 0
    shapeMismatches: int = 0
    missing: bool = False  # the converted model has no such output
    worstSample: int | None = None  # sample index holding the largest error
    decision: DecisionMetrics | None = None  # when the tolerance has a rule for this output

    def to_dict(self) -> dict[str, float]:
        """camelCase numbers for report.json and ProbeResult.metrics; None fields omitted.
        Decision metrics are flattened: ``decisionAgreement``, ``decisions`` (their count),
        ``segmentsOriginal``, ``segmentsConverted``, ``maxBoundaryShift``,
        ``positiveOriginal``."""
        out: dict[str, float] = {}
        for key, value in self.__dict__.items():
            if key in ("name", "decision") or value is None:
                continue
            out[key] = float(value) if isinstance(value, float) else int(value)
        if self.decision is not None:
            out["decisionAgreement"] = self.decision.agreement
            keys = ("decisions", "segmentsOriginal", "segmentsConverted", "maxBoundaryShift",
                    "positiveOriginal")  # fmt: skip
            for key in keys:
                value = getattr(self.decision, key)
                if value is not None:
                    out[key] = int(value)
        return out


def compare_output(
    name: str, original: Sequence[np.ndarray], converted: Sequence[np.ndarray]
) -> OutputMetrics:
    """Metrics of output ``name``: ``original[i]`` and ``converted[i]`` are sample i's values
    (any shape; cast to float64). Both sequences have one entry per sample."""
    original = [as_array(a) for a in original]
    converted = [as_array(b) for b in converted]
    exact = all(_exact(a) and _exact(b) for a, b in zip(original, converted, strict=True))
    m = OutputMetrics(name=name, exact=exact)
    pairs, owners = [], []
    for i, (a, b) in enumerate(zip(original, converted, strict=True)):
        if np.shape(a) != np.shape(b):
            m.shapeMismatches += 1
            m.worstSample = i if m.worstSample is None else m.worstSample
            continue
        pairs.append((np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()))
        owners.append(np.full(np.size(a), i))
    if not pairs:
        return m
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    sample_of = np.concatenate(owners)
    m.elements = int(a.size)
    if exact:
        differ = a != b
        m.mismatches = int(differ.sum())
        if m.mismatches and m.worstSample is None:
            m.worstSample = int(sample_of[np.argmax(differ)])
        m.maxAbsError = float(np.abs(a - b).max()) if a.size else 0.0
        return m
    fa, fb = np.isfinite(a), np.isfinite(b)
    m.nanOriginal, m.infOriginal = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    m.nanConverted, m.infConverted = int(np.isnan(b).sum()), int(np.isinf(b).sum())
    new = fa & ~fb
    m.newNonFinite = int(new.sum())
    both = fa & fb
    if m.newNonFinite and m.worstSample is None:
        m.worstSample = int(sample_of[np.argmax(new)])
    if not both.any():
        return m
    a, b = a[both], b[both]
    err = np.abs(a - b)
    m.maxAbsError = float(err.max())
    m.meanAbsError = float(err.mean())
    m.cosineSimilarity = cosine(a, b)
    if m.worstSample is None:
        m.worstSample = int(sample_of[both][np.argmax(err)])
    return m


def as_array(value: object) -> np.ndarray:
    """An output as an array. onnxruntime returns a sequence of maps (ZipMap: one
    ``{class: probability}`` per row, scikit-learn classifiers converted with skl2onnx) as a
    list of dicts: it becomes a (rows, keys) float array, keys in sorted order."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = sorted(value[0])
        if all(sorted(v) == keys for v in value):
            return np.array([[v[k] for k in keys] for v in value], np.float64)
    return np.asarray(value)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors in float64: 1.0 if both are zero, 0.0 if one is."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    # Clip: rounding can push identical vectors a hair above 1.
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def check_output_names(tolerance: Tolerance, outputs: Sequence[str], model: str) -> None:
    """Raise InvalidSpec when ``tolerance.decisions`` or ``tolerance.outputs`` names an
    output ``model`` does not have (a typo ran the whole conversion and its repair ladder,
    then failed as ConversionFailed or ValidationFailed)."""
    for where, named in (("decisions", tolerance.decisions), ("outputs", tolerance.outputs)):
        unknown = sorted(set(named or {}) - set(outputs))
        if unknown:
            raise InvalidSpec(
                f"spec.validation.tolerance.{where}.{unknown[0]}: {model} has no such output "
                f"(outputs: {', '.join(outputs)})"
            )


def check_tolerance(metrics: Sequence[OutputMetrics], tolerance: Tolerance) -> list[str]:
    """Human-readable violations, one per broken bound and output, e.g.
    ``"output 'stateN': maxAbsError 0.031 > 0.01"``; empty when everything holds.

    Missing outputs, shape mismatches, new NaN/Inf and integer mismatches always violate;
    the float bounds apply only where the tolerance sets them, per output as
    :meth:`Tolerance.bounds_for` merges them (its kind's bounds, then its own).
    """
    out: list[str] = []
    rules = tolerance.decisions or {}
    names = [m.name for m in metrics]
    named = [("decision rule", n) for n in rules]
    named += [("bounds", n) for n in tolerance.outputs or {}]
    for what, name in named:
        if metrics and name not in names:
            out.append(f"{what} for output {name!r}: the model has no such output "
                       f"(outputs: {', '.join(names)})")  # fmt: skip
    for m in metrics:
        tag = f"output {m.name!r}"
        if m.decision is not None and m.name in rules:
            out += decision_violations(tag, rules[m.name], m.decision)
        if m.missing:
            out.append(f"{tag}: missing from the converted model")
            continue
        if m.shapeMismatches:
            out.append(
                f"{tag}: shape differs from the original in {m.shapeMismatches} sample(s) "
                f"(first: sample {m.worstSample})"
            )
        if m.newNonFinite:
            out.append(
                f"{tag}: {m.newNonFinite} NaN/Inf value(s) where the original is finite "
                f"(NaN {m.nanConverted}, Inf {m.infConverted}; first in sample {m.worstSample})"
            )
        if m.exact:
            if m.mismatches:
                out.append(
                    f"{tag}: {m.mismatches} of {m.elements} integer values differ "
                    f"(integer/bool outputs must match exactly)"
                )
            continue
        bounds = tolerance.bounds_for(m.name)
        _bound(out, tag, "maxAbsError", m.maxAbsError, bounds.maxAbsError, ">")
        _bound(out, tag, "meanAbsError", m.meanAbsError, bounds.maxMeanAbsError, ">")
        _bound(out, tag, "cosineSimilarity", m.cosineSimilarity, bounds.minCosineSimilarity, "<")
    return out


def _bound(
    out: list[str], tag: str, key: str, value: float | None, limit: float | None, op: str
) -> None:
    if value is None or limit is None:
        return

    def beyond(x: float) -> bool:
        return x > limit if op == ">" else x < limit

    if not beyond(value):
        return
    # Fewest significant digits that still show the value on the wrong side of the limit.
    text = next(
        (t for t in (f"{value:.{p}g}" for p in range(3, 18)) if beyond(float(t))), repr(value)
    )
    out.append(f"{tag}: {key} {text} {op} {limit:g}")


def _exact(arr: np.ndarray) -> bool:
    return np.asarray(arr).dtype.kind in "iub"
