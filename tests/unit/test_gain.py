"""The NoGain rule (kquant_job.gain): an INT8 result larger than 0.9x or slower than 1.2x its
original is no gain; requireGain: false and the float precisions are never checked."""

from __future__ import annotations

import pytest

from kquant_api import QuantizationConfig, ValidationSummary
from kquant_job.gain import gain_shortfalls

INT8 = QuantizationConfig(precision="int8")


def summary(original_ms: float, quantized_ms: float) -> ValidationSummary:
    return ValidationSummary(
        passed=True,
        samples=4,
        device="cpu",
        latencyMs={"original": original_ms, "quantized": quantized_ms},
    )


@pytest.mark.parametrize(
    ("original", "quantized", "ms", "expected"),
    [
        (1000, 760, (1.0, 0.97), []),  # Silero VAD's INT8: 0.76x, a little faster
        (1000, 900, (1.0, 1.2), []),  # both at their bound
        (1000, 1000, (1.0, 1.0), ["1.00x the original's size"]),  # one Gemm left INT8
        (1000, 1050, (1.0, 3.8), ["1.05x the original's size", "3.80x the original's latency"]),
        (1000, 500, (2.0, 2.6), ["1.30x the original's latency on cpu"]),
        (1000, 500, (0.10, 0.13), []),  # 1.3x, but 0.03 ms: noise on a tiny model
        (1000, 500, (0.10, 0.38), ["3.80x the original's latency"]),
        # "hey jarvis" INT8 static: 3.42x a 0.034 ms model, +0.082 ms under the 0.1 ms floor
        (1000, 500, (0.034, 0.116), ["3.41x the original's latency"]),
        (1000, 500, (0.034, 0.065), []),  # 1.91x by 0.031 ms: within a tiny model's noise
    ],
)
def test_int8_results_that_pay_nothing_are_named(
    original: int, quantized: int, ms: tuple[float, float], expected: list[str]
) -> None:
    found = gain_shortfalls(INT8, original, quantized, summary(*ms))
    assert len(found) == len(expected)
    for text, start in zip(found, expected, strict=True):
        assert text.startswith(start), text


def test_without_latency_only_the_size_counts() -> None:
    assert gain_shortfalls(INT8, 1000, 500, None) == []
    # a median of 3 timed runs decides only past 2x, as noise moves a few runs by 1.5x
    assert gain_shortfalls(INT8, 1000, 500, summary(1.0, 1.8), latency_runs=3) == []
    few = gain_shortfalls(INT8, 1000, 500, summary(400.0, 2100.0), latency_runs=2)
    assert len(few) == 1 and "5.25x the original's latency" in few[0] and "2 runs" in few[0]
    assert gain_shortfalls(INT8, 1000, 500, summary(1.0, 5.0), latency_runs=0) == []
    # ...and by 5 ms: a 0.18 ms model timed 3 times on a loaded machine read 2.05x (past the
    # ratio of a tiny model's confirmed timing, which needs 10 runs)
    assert gain_shortfalls(INT8, 1000, 500, summary(0.181, 0.37), latency_runs=3) == []
    assert gain_shortfalls(INT8, 1000, 950, None)[0].startswith("0.95x the original's size")


def test_a_slow_int8_conv_is_told_of_static_int8() -> None:
    slow = summary(92.0, 246.0)
    conv = gain_shortfalls(INT8, 1000, 250, slow, latency_runs=9, conv_integer=True)
    assert len(conv) == 1 and "ConvInteger" in conv[0] and "mode: static" in conv[0]
    assert "ConvInteger" not in gain_shortfalls(INT8, 1000, 250, slow, latency_runs=9)[0]
    assert gain_shortfalls(INT8, 1000, 250, summary(92.0, 90.0), conv_integer=True) == []


def test_require_gain_false_turns_it_off_and_float_precisions_are_judged_on_size_only() -> None:
    off = QuantizationConfig(precision="int8", requireGain=False)
    assert gain_shortfalls(off, 1000, 2000, summary(1.0, 5.0)) == []
    fp16 = QuantizationConfig(precision="fp16")  # FP16 on a CPU is slower, and expected to be
    assert gain_shortfalls(fp16, 1000, 550, summary(1.0, 5.0)) == []
    for precision in ("fp16", "bf16"):  # the corpus's 2 KB model: FP16 3.49x its size
        larger = gain_shortfalls(QuantizationConfig(precision=precision), 1000, 3490,
                                 summary(1.0, 5.0))  # fmt: skip
        assert larger == ["3.49x the original's size (3490 vs 1000 bytes; at most 0.9x pays off)"]
    off16 = QuantizationConfig(precision="fp16", requireGain=False)
    assert gain_shortfalls(off16, 1000, 3490, summary(1.0, 5.0)) == []


def test_the_fp16_gpu_note_is_for_fp16_only_and_a_cli_writer_has_no_generation() -> None:
    from kquant_job.sets import Writer
    from kquant_job.table import result_notes

    slow = ValidationSummary(passed=True, samples=4, device="cpu",
                             latencyMs={"original": 1.0, "quantized": 3.0, "runs": 20})  # fmt: skip
    assert "GPUs" in result_notes([], slow, "fp16")[0]
    assert "GPUs" not in result_notes([], slow, "int8")[0]  # a new user's INT8 job got it
    cli = Writer("job").describe()
    assert cli.startswith("job (run ") and "None" not in cli
    assert Writer("vad", "speech", "uid-1", 2).describe().startswith("speech/vad (generation 2,")
