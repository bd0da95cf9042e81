"""Tolerances on decisions: what users feel rather than numeric error.

A numeric bound hides what a model's consumer decides from its outputs: Silero VAD's FP16
passes with a speech-probability error of 2e-2, yet on real speech a segment can start a
frame later. A decision rule says how an output is read, and the tolerance bounds how often
the converted model decides differently:

- ``threshold`` (a detector: speech / non-speech at 0.5): each value of the output, over the
  samples in order (one stream), is a decision ``value > threshold``; the runs of positive
  decisions are the segments it yields (speech segments, for a VAD);
- ``argmax`` (a classifier's top-1, a CTC model's token per frame): the index of the largest
  value along ``axis``, per sample and position.

``agreement`` is the share of decisions that are the same in both models. For thresholds the
segments are also compared: their counts, and the largest shift of a segment's start or end
(in decisions, i.e. frames) when the counts match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class DecisionMetrics:
    """How one output's decisions compare (see the module docstring): ``agreement`` (0...1)
    over ``decisions`` decisions; for thresholds the segment counts of both models, the
    largest boundary shift in decisions (None when the counts differ) and how many of the
    original's decisions are positive (all of them: one segment spanning the stream, no
    boundary to compare)."""

    kind: str
    decisions: int
    agreement: float
    segmentsOriginal: int | None = None
    segmentsConverted: int | None = None
    maxBoundaryShift: int | None = None
    positiveOriginal: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """camelCase fields for report.json; None fields omitted."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def segments(decisions: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True in a 1-D bool array, as ``(start, end)`` index pairs (end exclusive)."""
    padded = np.concatenate([[False], decisions.astype(bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def compare_decisions(
    rule: Any, original: Sequence[np.ndarray], converted: Sequence[np.ndarray]
) -> DecisionMetrics:
    """Decisions of ``rule`` (a :class:`kquant_api.spec.DecisionRule`) on one output,
    ``original[i]``/``converted[i]`` being sample i's values (same shapes)."""
    if rule.kind == "argmax":
        a = np.concatenate([np.argmax(np.asarray(x), axis=rule.axis).ravel() for x in original])
        b = np.concatenate([np.argmax(np.asarray(x), axis=rule.axis).ravel() for x in converted])
        agree = float(np.mean(a == b)) if a.size else 1.0
        return DecisionMetrics("argmax", int(a.size), agree)
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in original]) > rule.threshold
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in converted]) > rule.threshold
    agree = float(np.mean(a == b)) if a.size else 1.0
    sa, sb = segments(a), segments(b)
    shift = None
    if len(sa) == len(sb):
        shift = max((max(abs(x[0] - y[0]), abs(x[1] - y[1])) for x, y in zip(sa, sb, strict=True)),
                    default=0)  # fmt: skip
    return DecisionMetrics("threshold", int(a.size), agree, len(sa), len(sb), shift, int(a.sum()))


def decision_violations(tag: str, rule: Any, m: DecisionMetrics) -> list[str]:
    """Human-readable violations of ``rule``'s bounds by ``m``; empty when they hold."""
    out = []
    kind = getattr(rule.kind, "value", rule.kind)
    what = f"{kind} at {rule.threshold:g}" if kind == "threshold" else "argmax"
    if m.agreement < rule.minAgreement:
        out.append(
            f"{tag}: decisions ({what}) agree on {m.agreement:.4f} < {rule.minAgreement:g} of "
            f"{m.decisions}"
        )
    if kind == "threshold":
        if m.segmentsOriginal != m.segmentsConverted:
            out.append(
                f"{tag}: {m.segmentsConverted} segments ({what}) where the original has "
                f"{m.segmentsOriginal}"
            )
        elif (
            rule.maxBoundaryShift is not None and (m.maxBoundaryShift or 0) > rule.maxBoundaryShift
        ):
            out.append(
                f"{tag}: a segment boundary ({what}) moves by {m.maxBoundaryShift} decisions > "
                f"{rule.maxBoundaryShift}"
            )
    return out
