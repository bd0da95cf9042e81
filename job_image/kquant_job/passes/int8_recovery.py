"""Accuracy-aware INT8: when every step of the fallback ladder misses the tolerance, find the
nodes whose quantization breaks it and leave only those in float.

The method is a sensitivity ranking followed by a search over how many of the most sensitive
nodes to keep float, as in Intel Neural Compressor's accuracy-aware tuning (its "fallback
ops by sensitivity" strategy) and onnxruntime's ``qdq_loss_debug`` guide, which compares each
node's quantized output with the float one:

1. Each quantizable node (or, past :data:`MAX_GROUPS`, each run of consecutive nodes in graph
   order) is quantized *alone* and probed; its score is the error that node adds to the
   outputs (:func:`score`). Errors of separate nodes add up roughly, so the nodes that add
   the most alone are the ones to keep float.
2. The top-k groups are left float, with k = 1, 2, 4... until a candidate passes the probe,
   then k is narrowed by bisection to the smallest passing k found.

At least one node always stays quantized (else the "INT8" model is the float one renamed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from kquant_job.passes.base import ProbeResult
from kquant_job.passes.int8_common import Int8Settings

MAX_GROUPS = 32  # probes spent on the ranking at most; past it nodes are ranked in runs
MAX_SHOWN = 10  # ranked groups listed in the report

# (settings, candidate path) -> the probe's verdict on the quantized candidate, or None when
# onnxruntime could not produce or load it.
TryFn = Callable[[Int8Settings, str], ProbeResult | None]


def score(result: ProbeResult | None) -> float:
    """The error a candidate adds to the outputs: the sum over outputs of mean abs error plus
    (1 - cosine similarity); ``inf`` when it failed to load or run. Dimensionless, used to
    rank nodes of one model against each other (never compared across models)."""
    if result is None or result.error:
        return math.inf
    total = 0.0
    for metrics in result.metrics.values():
        mae = metrics.get("meanAbsError")
        cos = metrics.get("cosineSimilarity")
        if mae is None and cos is None:
            continue
        if (mae is not None and not math.isfinite(mae)) or (
            cos is not None and not math.isfinite(cos)
        ):
            return math.inf
        total += (mae or 0.0) + (1.0 - cos if cos is not None else 0.0)
    return total


def groups_of(nodes: list[str], limit: int = MAX_GROUPS) -> list[tuple[str, ...]]:
    """``nodes`` in at most ``limit`` runs of consecutive names, as even as possible (one name
    per group when there are at most ``limit``)."""
    if not nodes:
        return []
    count = min(limit, len(nodes))
    size, extra = divmod(len(nodes), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        out.append(tuple(nodes[start:end]))
        start = end
    return out


@dataclass
class Recovery:
    """The outcome of :func:`recover`: the settings that passed (None when none did), the
    nodes left float, the ranking (``[{"nodes", "score"}]``, most harmful first) and the
    number of candidates quantized and probed."""

    settings: Int8Settings | None
    kept_float: list[str]
    ranking: list[dict[str, Any]]
    probes: int
    result: ProbeResult | None = None
    kept_groups: int = 0

    def describe(self) -> dict[str, Any]:
        """The recovery as recorded in report.json: the kept groups and a few after them
        (at least :data:`MAX_SHOWN`) of the ranking."""
        return {
            "keptFloat": self.kept_float,
            "ranking": self.ranking[: max(MAX_SHOWN, self.kept_groups + 3)],
            "rankedGroups": len(self.ranking),
            "probes": self.probes,
            "passed": self.settings is not None,
        }


def recover(base: Int8Settings, nodes: list[str], try_: TryFn) -> Recovery:
    """Rank ``nodes`` (quantizable node names in graph order, those of ``base`` not excluded)
    by the error each adds when quantized alone under ``base``, then find the fewest of the
    most harmful to add to ``base.nodes_to_exclude`` so a candidate passes ``try_``'s probe.

    ``try_(settings, label)`` quantizes with ``settings``, probes the candidate and returns
    the ProbeResult (None when no loadable candidate came out). Makes at most
    ``len(groups) + 2 * log2(len(groups)) + 1`` calls. Never raises on a failing candidate.
    """
    groups = groups_of([n for n in nodes if n not in base.nodes_to_exclude])
    probes = 0
    scored: list[tuple[float, tuple[str, ...]]] = []
    for i, group in enumerate(groups):
        result = try_(replace(base, nodes_to_quantize=group), f"rank-{i}")
        probes += 1
        scored.append((score(result), group))
    # most harmful first; ties keep graph order
    order = sorted(range(len(scored)), key=lambda i: -scored[i][0])
    ranked = [scored[i][1] for i in order]
    ranking = [{"nodes": list(scored[i][1]), "score": _round(scored[i][0])} for i in order]

    def attempt(k: int) -> tuple[Int8Settings, ProbeResult | None]:
        nonlocal probes
        floated = tuple(n for g in ranked[:k] for n in g)
        settings = replace(base, nodes_to_exclude=base.nodes_to_exclude + floated)
        probes += 1
        return settings, try_(settings, f"keep-{k}")

    passing: tuple[int, Int8Settings, ProbeResult] | None = None
    failing, k = 0, 1
    while k < len(ranked):
        settings, result = attempt(k)
        if result is not None and result.ok:
            passing = (k, settings, result)
            break
        failing, k = k, k * 2
    if passing is None and failing < len(ranked) - 1:
        k = len(ranked) - 1  # every group float but the least harmful one
        settings, result = attempt(k)
        if result is not None and result.ok:
            passing = (k, settings, result)
    if passing is None:
        return Recovery(None, [], ranking, probes)
    low, high = failing, passing[0]  # low fails, high passes
    while high - low > 1:
        mid = (low + high) // 2
        settings, result = attempt(mid)
        if result is not None and result.ok:
            high, passing = mid, (mid, settings, result)
        else:
            low = mid
    _, settings, result = passing
    kept = [n for g in ranked[: passing[0]] for n in g]
    return Recovery(settings, kept, ranking, probes, result, passing[0])


def _round(value: float) -> float | None:
    return None if not math.isfinite(value) else float(f"{value:.4g}")
