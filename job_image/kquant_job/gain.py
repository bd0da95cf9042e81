"""Whether a result pays off: an INT8 model that is not smaller, or slower, than its original
is no gain, however accurate (measured on the corpus: an INT8 model with every layer left float
but one Gemm came out 1.00x the size; a small one 1.5x larger, its scales and zero points
outweighing the weights saved; one 3.8x slower on the CPU).
"""

from __future__ import annotations

from kquant_api import Precision, QuantizationConfig, ValidationSummary

# INT8 weights are a quarter of FP32's bytes: a result above 0.9x barely quantized anything.
MAX_SIZE_RATIO = 0.9
# Medians of 20 runs of a sub-millisecond model move by up to ~10 % between runs on a busy
# machine; 1.2x is a slowdown no measurement noise explains.
MAX_LATENCY_RATIO = 1.2
# ...and a slowdown under 0.1 ms per run is timer and scheduling noise on a sub-millisecond
# model (measured: the same 0.1 ms model at 0.87x and 1.23x in two runs of 3 timings each).
MIN_SLOWDOWN_MS = 0.1
# Medians of fewer timed runs (validation.latencyRuns) are reported but decide nothing.
MIN_LATENCY_RUNS = 10


def slower(original_ms: float, quantized_ms: float) -> bool:
    """Whether a converted model's median latency (ms) counts as slower than the original's:
    above MAX_LATENCY_RATIO times it and by more than MIN_SLOWDOWN_MS."""
    return (
        original_ms > 0
        and quantized_ms / original_ms > MAX_LATENCY_RATIO
        and quantized_ms - original_ms > MIN_SLOWDOWN_MS
    )


def gain_shortfalls(
    config: QuantizationConfig,
    original_bytes: int,
    quantized_bytes: int,
    summary: ValidationSummary | None,
    latency_runs: int = 20,
) -> list[str]:
    """What makes this result no gain, one phrase each (empty: it pays off, or the check does
    not apply). Applies to precisions int8 and int4 unless ``requireGain`` is false. Sizes in bytes;
    latency from ``summary.latencyMs`` (medians, ms, on ``summary.device``), checked only
    when validation measured it over at least MIN_LATENCY_RUNS runs (``latency_runs``);
    slower means above MAX_LATENCY_RATIO and by more than MIN_SLOWDOWN_MS."""
    if config.precision not in (Precision.int8, Precision.int4) or config.requireGain is False:
        return []
    found = []
    if original_bytes and quantized_bytes > MAX_SIZE_RATIO * original_bytes:
        found.append(
            f"{quantized_bytes / original_bytes:.2f}x the original's size ({quantized_bytes} "
            f"vs {original_bytes} bytes; at most {MAX_SIZE_RATIO}x pays off)"
        )
    latency = summary.latencyMs if summary else None
    if summary and latency and latency.original > 0 and latency_runs >= MIN_LATENCY_RUNS:
        ratio = latency.quantized / latency.original
        if slower(latency.original, latency.quantized):
            found.append(
                f"{ratio:.2f}x the original's latency on {summary.device} "
                f"({latency.quantized:.3g} vs {latency.original:.3g} ms median; at most "
                f"{MAX_LATENCY_RATIO}x)"
            )
    return found
