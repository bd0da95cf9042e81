"""Whether a result pays off: an INT8 model that is not smaller, or slower, than its original
is no gain, however accurate (measured on the corpus: an INT8 model with every layer left float
but one Gemm came out 1.00x the size; a small one 1.5x larger, its scales and zero points
outweighing the weights saved; one 3.8x slower on the CPU). An FP16 or BF16 model that is not
smaller is none either (the corpus's FP16 of a 2 KB model came out 3.49x the size, its Casts
outweighing the weights halved); its latency is not judged: on a CPU, FP16 runs no faster than
FP32 (onnxruntime computes most FP16 ops through casts) and its gain is on GPUs.
"""

from __future__ import annotations

from kquant_api import Precision, QuantizationConfig, ValidationSummary

# INT8 weights are a quarter of FP32's bytes: a result above 0.9x barely quantized anything;
# FP16 halves them: above 0.9x, under a fifth of the bytes were converted.
MAX_SIZE_RATIO = 0.9
# Medians of 20 runs of a sub-millisecond model move by up to ~10 % between runs on a busy
# machine; 1.2x is a slowdown no measurement noise explains.
MAX_LATENCY_RATIO = 1.2
# ...and a slowdown under 0.1 ms per run is timer and scheduling noise on a sub-millisecond
# model (measured: the same 0.1 ms model at 0.87x and 1.23x in two runs of 3 timings each)...
MIN_SLOWDOWN_MS = 0.1
# ...unless the result takes more than twice as long: a ratio no noise reached on a confirmed
# timing (the faster of two rounds of each model; a tiny model's rounds moved by up to 1.5x),
# where the floor alone published an INT8 static "hey jarvis" wake-word classifier at 3.42x
# its 0.03 ms original (+0.081 ms) in one run of the wheel corpus and NoGain at 6.17x in another.
TINY_SLOWDOWN_RATIO = 2.0
# Medians of at least this many timed runs (validation.latencyRuns) decide at
# MAX_LATENCY_RATIO...
MIN_LATENCY_RUNS = 10
# ...and medians of fewer (a large model within validation.latencyBudgetMs: 2-9 runs) only
# past this ratio: one round of the same model moved between 0.5x and 1.5x on a busy machine,
# and dynamic INT8 of real OCR and detection models (ConvInteger) ran 2.6-5.3x slower than
# FP32 on 2-9 runs and was published as a success while few runs decided nothing.
FEW_RUNS_LATENCY_RATIO = 2.0
# ...and by at least this much: a model gets few runs because each is long (tens to hundreds
# of ms); a sub-millisecond model a spec times 3 times moved past 2x on a loaded machine.
FEW_RUNS_MIN_SLOWDOWN_MS = 5.0


def slower(
    original_ms: float,
    quantized_ms: float,
    runs: int = MIN_LATENCY_RUNS,
    interleaved: float | None = None,
) -> bool:
    """Whether a converted model's median latency (ms, over ``runs`` timed runs each) counts
    as slower than the original's: above MAX_LATENCY_RATIO times it and by more than
    MIN_SLOWDOWN_MS, or above TINY_SLOWDOWN_RATIO times it by any margin; when ``runs`` <
    MIN_LATENCY_RUNS, above FEW_RUNS_LATENCY_RATIO and by more than
    FEW_RUNS_MIN_SLOWDOWN_MS. ``interleaved``: the ratio of a confirming timing in blocks of
    each model in turn (:mod:`kquant_job.validate.interleaved`), which decides alone, above
    MAX_LATENCY_RATIO by any margin: drift between the medians' blocks is what the floor
    forgave. No timed run: never."""
    if runs <= 0 or original_ms <= 0:
        return False
    if interleaved is not None:
        return interleaved > MAX_LATENCY_RATIO
    ratio, margin_ms = _limits(runs)
    over = quantized_ms / original_ms
    if runs >= MIN_LATENCY_RUNS and over > TINY_SLOWDOWN_RATIO:
        return True
    return over > ratio and quantized_ms - original_ms > margin_ms


def _limits(runs: int) -> tuple[float, float]:
    """(latency ratio, slowdown in ms) past which medians of ``runs`` timed runs count."""
    if runs < MIN_LATENCY_RUNS:
        return FEW_RUNS_LATENCY_RATIO, FEW_RUNS_MIN_SLOWDOWN_MS
    return MAX_LATENCY_RATIO, MIN_SLOWDOWN_MS


def gain_shortfalls(
    config: QuantizationConfig,
    original_bytes: int,
    quantized_bytes: int,
    summary: ValidationSummary | None,
    latency_runs: int = 20,
    conv_integer: bool = False,
) -> list[str]:
    """What makes this result no gain, one phrase each (empty: it pays off, or the check does
    not apply; ``requireGain: false`` turns it off). Sizes in bytes: above MAX_SIZE_RATIO
    times the original's; for int8 and int4 also latency from ``summary.latencyMs``
    (medians, ms, on ``summary.device``, over ``latency_runs`` timed runs each): slower as
    :func:`slower` counts it. A result whose slowdown is in the INT8 Conv kernels
    (``conv_integer``: the model holds ConvInteger) is told of static INT8."""
    if config.requireGain is False:
        return []
    found = []
    if original_bytes and quantized_bytes > MAX_SIZE_RATIO * original_bytes:
        found.append(
            f"{quantized_bytes / original_bytes:.2f}x the original's size ({quantized_bytes} "
            f"vs {original_bytes} bytes; at most {MAX_SIZE_RATIO}x pays off)"
        )
    if config.precision not in (Precision.int8, Precision.int4):
        return found  # FP16/BF16: not timed (module docstring)
    latency = summary.latencyMs if summary else None
    if (
        summary
        and latency
        and slower(latency.original, latency.quantized, latency_runs, latency.interleavedRatio)
    ):
        if latency.interleavedRatio is not None:
            found.append(
                f"{latency.interleavedRatio:.2f}x the original's latency on {summary.device} "
                f"(blocks of each model in turn, {latency.interleavedRuns} runs each; medians "
                f"{latency.quantized:.3g} vs {latency.original:.3g} ms; at most "
                f"{MAX_LATENCY_RATIO}x)"
            )
        else:
            found.append(
                f"{latency.quantized / latency.original:.2f}x the original's latency on "
                f"{summary.device} ({latency.quantized:.3g} vs {latency.original:.3g} ms "
                f"median of {latency_runs} runs; at most {_limits(latency_runs)[0]}x)"
            )
        if conv_integer:
            found[-1] += (
                "; the result holds ConvInteger, onnxruntime's dynamic INT8 Conv, which "
                "lacks the optimized kernels of its float Conv: static INT8 (mode: static, "
                "with calibration data) quantizes Conv as QLinearConv, or "
                "opTypesToQuantize: [MatMul, Gemm] leaves Conv float"
            )
    return found


def latency_ratio(original_ms: float, quantized_ms: float, interleaved: float | None) -> float:
    """The latency ratio the gain rule judges: ``interleaved`` when a confirming timing
    measured it, else the medians' ``quantized_ms / original_ms`` (0 without an original)."""
    if interleaved is not None:
        return interleaved
    return quantized_ms / original_ms if original_ms > 0 else 0.0
