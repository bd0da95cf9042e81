"""The latency ratio that decides a slowdown of a small model on the CPU: blocks of runs of
each model in turn, each block summed up by a low quantile of its run times.

Medians of two blocks timed one after the other (``latencyMs.timing: sequential``) carry
the drift between the blocks: on this project's 2-core machine the same 0.06-0.2 ms model
timed against itself read 0.63x-1.48x (median of 20 runs, a busy core beside it), so a
slowdown of a tiny model could not be told from noise, and the gain rule forgave any under
0.1 ms. Blocks in ABBA order put drift on both models alike, and the 10th percentile of a
block is the run the scheduler left alone: the same model against itself then read
0.93x-1.08x, loaded or not, and whisper_tiny's INT8 result, 0.01 ms slower, read 1.17x-1.24x
in every try (trials of 8-15 timings each, stop 25; README, "variant table").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from kquant_job.prefetch import settle

ROUNDS = 6  # blocks per model: three ABBA pairs
BLOCK_RUNS = 20  # timed runs per block at most...
MIN_BLOCK_RUNS = 5  # ...and at least, a larger model's fewer runs to stay within the budget
WARMUP_RUNS = 2  # untimed runs opening each block: the other session's threads wind down
QUANTILE = 0.1


def low_quantile(times: list[float], q: float = QUANTILE) -> float:
    """The ``q`` quantile of ``times`` (nearest rank below: of 20 values at 0.1, the 2nd
    smallest). Raises ValueError on an empty list."""
    if not times:
        raise ValueError("no run times")
    ordered = sorted(times)
    return ordered[int(q * (len(ordered) - 1))]


def block_runs(pair_ms: float, budget_ms: float, rounds: int = ROUNDS) -> int:
    """Timed runs per block so that ``rounds`` blocks of both models (a run of each taking
    about ``pair_ms`` together) fit in ``budget_ms``: at most BLOCK_RUNS; 0 when not even
    MIN_BLOCK_RUNS fit (a model that slow is timed in blocks of its own: its runs are long
    beside the drift and preemptions of a sub-millisecond one)."""
    if pair_ms <= 0:
        return BLOCK_RUNS
    fits = min(BLOCK_RUNS, int(budget_ms / (rounds * pair_ms)))
    return fits if fits >= MIN_BLOCK_RUNS else 0


def interleaved_ratio(
    original: Callable[[], object],
    converted: Callable[[], object],
    runs: int = BLOCK_RUNS,
    rounds: int = ROUNDS,
    warmup: int = WARMUP_RUNS,
) -> tuple[float, int]:
    """(ratio, runs): the median over ``rounds`` blocks of each model, in ABBA order, of
    the converted model's block time over the original's, each block's time being the
    QUANTILE of its ``runs`` timed calls (wall time, ``time.perf_counter``) after
    ``warmup`` untimed ones; ``runs``: the timed calls of each model in all. Raises what
    the calls raise."""
    settle()  # no import running beside the timed calls
    ratios: list[float] = []
    for r in range(rounds):
        order = ((0, original), (1, converted)) if r % 2 == 0 else ((1, converted), (0, original))
        low = [0.0, 0.0]
        for index, call in order:
            for _ in range(warmup):
                call()
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                call()
                times.append((time.perf_counter() - start) * 1000.0)
            low[index] = low_quantile(times)
        if low[0] > 0:
            ratios.append(low[1] / low[0])
    ratio = float(statistics.median(ratios)) if ratios else 1.0
    return ratio, runs * rounds
