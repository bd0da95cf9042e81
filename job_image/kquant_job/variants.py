"""Variants: several candidate conversions of one model in one job, compared on the same
validation samples, every passing one published under its own name, the best by the job's
objective chosen (and promoted).

This module holds the parts that need no storage or sandbox: the per-variant jobs, the
comparison entry of each variant, the choice, and the table rows. The run itself is in
:mod:`kquant_job.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kquant_api import Objective, QuantizationJob
from kquant_api.result import VariantResult
from kquant_job.gain import latency_ratio


def variant_jobs(job: QuantizationJob) -> list[tuple[str, QuantizationJob]]:
    """One single-conversion job per entry of ``spec.variants`` (its name, the job with
    ``spec.quantization`` set to it and no variants), in spec order; ``[(label, job)]`` for a
    single-conversion spec."""
    spec = job.spec
    if not spec.variants:
        assert spec.quantization is not None
        return [(spec.quantization.label, job)]
    out = []
    for variant in spec.variants:
        own = spec.model_copy(update={"quantization": variant, "variants": None, "selection": None})
        out.append((variant.label, job.model_copy(update={"spec": own})))
    return out


@dataclass
class VariantOutcome:
    """One variant's end: its result entry (``entry``); when it was converted, its judgement
    (``judged``: a :class:`kquant_job.pipeline.Assessed`), its staged folder and the files
    in it (``rels``); when it failed before, the error (``error``: message and detail)."""

    entry: VariantResult
    judged: Any = None
    staged: Path | None = None
    rels: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None


def _latency(entry: VariantResult) -> float:
    return entry.latencyMs.quantized if entry.latencyMs else float("inf")


def choose(outcomes: list[VariantOutcome], objective: Objective) -> VariantOutcome | None:
    """The passing variant that best meets ``objective`` (None when none passed):
    ``smallest`` the fewest bytes, ``fastest`` the lowest median latency on the job's
    execution provider, ``mostAccurate`` the highest worst-output cosine similarity, then the
    lowest mean abs error. Ties go to the earlier variant in the spec: equal sizes are not
    told apart by latency, whose noise made reruns of an unchanged job promote another
    variant each time, renaming what production reads (variants trial)."""
    passing = [o for o in outcomes if o.entry.passed]
    if not passing:
        return None

    def key(o: VariantOutcome) -> tuple[float, ...]:
        e = o.entry
        size = float(e.quantizedBytes or 0)
        if objective is Objective.fastest:
            return (_latency(e), size)
        if objective is Objective.mostAccurate:
            cosine = e.cosineSimilarity if e.cosineSimilarity is not None else -1.0
            mae = e.meanAbsError if e.meanAbsError is not None else float("inf")
            return (-cosine, mae, size)
        return (size,)

    return min(passing, key=key)  # the first of equal keys: spec order


def why_chosen(chosen: VariantOutcome, objective: Objective, original_bytes: int) -> str:
    """One phrase: what made ``chosen`` the best, e.g. ``"smallest passing: 0.26x the
    original's size"``."""
    e = chosen.entry
    if objective is Objective.fastest and e.latencyMs:
        ratio = e.latencyMs.quantized / e.latencyMs.original if e.latencyMs.original else 0
        return f"fastest passing: {ratio:.2f}x the original's latency"
    if objective is Objective.mostAccurate and e.cosineSimilarity is not None:
        return f"most accurate passing: worst-output cosine {e.cosineSimilarity:.6f}"
    ratio = (e.quantizedBytes or 0) / original_bytes if original_bytes else 0
    return f"smallest passing: {ratio:.2f}x the original's size"


def comparison_rows(
    outcomes: list[VariantOutcome], chosen: VariantOutcome | None, original_bytes: int, why: str
) -> list[tuple[str, str]]:
    """Table rows: one per variant (verdict, size and latency as ratios, worst cosine and
    mean abs error, or why it failed), then the chosen one."""
    rows = []
    for o in outcomes:
        e = o.entry
        parts = ["passed" if e.passed else f"FAILED ({e.reason})"]
        if e.quantizedBytes is not None and original_bytes:
            parts.append(f"{e.quantizedBytes / original_bytes:.2f}x size")
        if e.latencyMs and e.latencyMs.original:
            lat = e.latencyMs
            ratio = latency_ratio(lat.original, lat.quantized, lat.interleavedRatio)
            parts.append(f"{ratio:.2f}x latency")
        if e.cosineSimilarity is not None:
            parts.append(f"cosine {e.cosineSimilarity:.6f}")
        if e.meanAbsError is not None:
            parts.append(f"mean abs {e.meanAbsError:.3g}")
        if not e.passed and e.message:
            parts.append(e.message[:160])
        mark = " *" if chosen is o else ""
        rows.append((f"variant {e.name}{mark}", ", ".join(parts)))
    rows.append(("chosen", f"{chosen.entry.name} ({why})" if chosen else "none passed"))
    return rows
