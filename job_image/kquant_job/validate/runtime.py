"""onnxruntime plumbing for validation: providers, quiet sessions, streaming runs, timing, sizes.

Streaming models (Silero VAD, RNN-T encoders, any model with recurrent state) take their own
previous output as the next input. With ``feedback = {output: input}`` the samples are one
stream: step i+1's ``input`` is step i's ``output`` of the *same* session, so the original and
the converted model each thread their own state and any drift accumulates as it would in
production. The first step uses the state given in the feed.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kquant_api import Reason
from kquant_job.errors import InvalidSpec, PassError
from kquant_job.prefetch import settle
from kquant_job.validate.inputs import Feed, numpy_dtype

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def select_providers(prefer: str = "auto") -> tuple[list[str], str]:
    """onnxruntime execution providers and the device name they run on.

    ``prefer``: ``auto`` (CUDA when this onnxruntime build offers it, else CPU), ``cuda``
    or ``cpu``. Returns e.g. ``(["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda")``;
    CPU stays listed as the fallback for ops without a CUDA kernel.

    Raises InvalidSpec for an unknown ``prefer`` or ``cuda`` without the CUDA provider.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if prefer not in ("auto", "cuda", "cpu"):
        raise InvalidSpec(f"unknown device preference {prefer!r} (auto, cuda or cpu)")
    if prefer == "cuda" and CUDA not in available:
        raise InvalidSpec(
            f"CUDA requested but this onnxruntime has no {CUDA} (has: {', '.join(available)})"
        )
    if prefer != "cpu" and CUDA in available:
        return [CUDA, CPU], "cuda"
    return [CPU], "cpu"


def device_of(session: Any) -> str:
    """``cuda`` when the session's first provider is CUDA, else ``cpu`` (what really ran:
    onnxruntime falls back to CPU silently when CUDA fails to initialise)."""
    return "cuda" if session.get_providers()[0] == CUDA else "cpu"


def make_session(path: Path, providers: Sequence[str]) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path`` with log severity 3 (errors only).

    Raises PassError(CorruptModel) with onnxruntime's message when the model does not load.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # keep initializer-cleanup warnings out of the job log
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as exc:
        raise PassError(
            f"{Path(path).name}: onnxruntime cannot load the model: {short(exc)}",
            reason=Reason.CorruptModel,
        ) from exc


def check_feedback(session: Any, feedback: dict[str, str]) -> None:
    """Raise InvalidSpec unless every feedback key is an output and every value an input."""
    outputs = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    for out, inp in feedback.items():
        if out not in outputs:
            raise InvalidSpec(
                f"spec.validation.feedback: the model has no output {out!r} "
                f"(outputs: {', '.join(outputs)})"
            )
        if inp not in inputs:
            raise InvalidSpec(
                f"spec.validation.feedback.{out}: the model has no input {inp!r} "
                f"(inputs: {', '.join(inputs)})"
            )


def adapt_feed(session: Any, feed: Feed) -> Feed:
    """The session's inputs from ``feed``, each cast to the dtype the session expects (FP16
    models converted without keepIoTypes take float16). Other arrays are dropped."""
    out: Feed = {}
    for arg in session.get_inputs():
        if arg.name in feed:
            out[arg.name] = np.asarray(feed[arg.name], dtype=numpy_dtype(arg.type))
    return out


def run_stream(
    session: Any, feeds: Sequence[Feed], feedback: dict[str, str]
) -> list[dict[str, np.ndarray]]:
    """Run ``session`` on each feed in order; returns one ``{output name: array}`` per feed
    (:func:`iter_stream`, collected)."""
    return [outputs for _, outputs in iter_stream(session, feeds, feedback)]


def iter_stream(
    session: Any, feeds: Sequence[Feed], feedback: dict[str, str]
) -> Iterator[tuple[Feed, dict[str, np.ndarray]]]:
    """Run ``session`` on each feed in order, yielding ``(feed as run, {output name:
    array})`` one sample at a time (a caller that keeps only a summary holds one sample).

    With ``feedback`` non-empty the feeds form one stream: output ``X`` of step i replaces
    input ``feedback[X]`` of step i+1 (the first step keeps the feed's value).

    Raises InvalidSpec for feedback names the model lacks, RuntimeError("sample i: ...")
    when onnxruntime fails on a sample.
    """
    check_feedback(session, feedback)
    names = [o.name for o in session.get_outputs()]
    previous: dict[str, np.ndarray] | None = None
    for i, feed in enumerate(feeds):
        feed = dict(feed)
        if feedback and previous is not None:
            for out, inp in feedback.items():
                feed[inp] = previous[out]
        try:
            values = session.run(None, adapt_feed(session, feed))
        except Exception as exc:
            raise RuntimeError(f"sample {i}: {short(exc)}") from exc
        previous = dict(zip(names, values, strict=True))
        yield feed, previous


def median_latency_ms(session: Any, feed: Feed, runs: int, warmup: int) -> float:
    """Median wall time of ``session.run`` on ``feed`` in milliseconds over ``runs`` timed
    runs after ``warmup`` untimed ones (``time.perf_counter``; the median resists outliers
    such as a first CUDA kernel compile or a scheduler hiccup): :func:`block_latency_ms`
    without a time budget."""
    return block_latency_ms(session_call(session, feed), runs, warmup, math.inf)[0]


# Timed runs before a measurement may stop on a known median: the gain rule's runs for
# its normal margins (kquant_job.gain.MIN_LATENCY_RUNS).
MIN_STOP_RUNS = 10


def median_known(times: Sequence[float], precision: float) -> bool:
    """Whether the median of ``times`` (ms) is known to within ``precision`` (a fraction of
    it): at least MIN_STOP_RUNS values, and the half-width of the median's distribution-free
    95 % confidence interval at most ``precision`` times the median. The interval runs from
    the r-th to the s-th smallest value, r = n/2 - 1.96 sqrt(n)/2 and s = 1 + n/2 + 1.96
    sqrt(n)/2 rounded to the nearest rank (Campbell & Gardner, "Calculating confidence
    intervals for some non-parametric analyses", BMJ 296:1454, 1988; 10 runs: the 2nd to the
    9th). ``precision`` 0: never."""
    n = len(times)
    if precision <= 0 or n < MIN_STOP_RUNS:
        return False
    ordered = sorted(times)
    half = 1.96 * math.sqrt(n) / 2
    low = max(1, round(n / 2 - half))
    high = min(n, round(1 + n / 2 + half))
    median = statistics.median(ordered)
    return median > 0 and (ordered[high - 1] - ordered[low - 1]) / 2 <= precision * median


def paired_latency_ms(
    original: Callable[[], object],
    converted: Callable[[], object],
    runs: int,
    warmup: int,
    budget_ms: float,
    precision: float = 0.0,
) -> dict[str, float]:
    """Median wall time (ms, ``time.perf_counter``) of two calls timed in alternation, so
    that drift (clock boost, a noisy neighbour) weighs on both alike: ``warmup`` untimed
    calls of each, then pairs until ``runs`` pairs, until the timed pairs have spent
    ``budget_ms`` (at least one pair), or until both medians are known to within
    ``precision`` (:func:`median_known`). Returns ``{"original", "quantized"}`` medians and
    ``"runs"``, the pairs timed. The median resists outliers such as a first CUDA kernel
    compile or a scheduler hiccup."""
    settle()  # no import running beside the timed calls
    for _ in range(warmup):
        original()
        converted()
    times: tuple[list[float], list[float]] = ([], [])
    spent = 0.0
    while len(times[0]) < runs and (not times[0] or spent < budget_ms):
        for call, out in ((original, times[0]), (converted, times[1])):
            start = time.perf_counter()
            call()
            out.append((time.perf_counter() - start) * 1000.0)
            spent += out[-1]
        if median_known(times[0], precision) and median_known(times[1], precision):
            break
    return {
        "original": float(statistics.median(times[0])),
        "quantized": float(statistics.median(times[1])),
        "runs": len(times[0]),
    }


def block_latency_ms(
    call: Callable[[], object],
    runs: int,
    warmup: int,
    budget_ms: float,
    precision: float = 0.0,
) -> tuple[float, int]:
    """Median wall time (ms, ``time.perf_counter``) of ``call`` over up to ``runs`` timed calls
    after ``warmup`` untimed ones, stopping once the timed calls have spent ``budget_ms`` (at
    least one) or once the median is known to within ``precision`` (:func:`median_known`);
    and the number timed. One model's block of a sequential measurement (the CPU's, where
    alternating sessions slow each other; :func:`paired_latency_ms` on a GPU)."""
    settle()  # no import running beside the timed calls
    for _ in range(warmup):
        call()
    times: list[float] = []
    while len(times) < runs and (not times or sum(times) < budget_ms):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
        if median_known(times, precision):
            break
    return float(statistics.median(times)), len(times)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim(0)``;
    a no-op elsewhere): a session released between stages otherwise leaves its pages in
    the process, under the next stage's peak."""
    import ctypes
    import gc

    gc.collect()
    # The process's own symbols: glibc's when linked with it (no library search, which
    # would run ldconfig).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def session_call(session: Any, feed: Feed) -> Callable[[], object]:
    """A call running ``session`` on ``feed`` (adapted to its input names once)."""
    inputs = adapt_feed(session, feed)
    return lambda: session.run(None, inputs)


def model_bytes(path: Path) -> int:
    """Size in bytes of an ONNX model file plus the external data files it references (in
    any graph, subgraphs included), each counted once. A file that does not parse as ONNX
    counts as its own size."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    locations = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            if "location" in info:
                locations.add(info["location"])
    for loc in sorted(locations):
        data = path.parent / loc
        if data.is_file():
            total += data.stat().st_size
    return total


def _tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def short(exc: BaseException, limit: int = 600) -> str:
    """An exception's message on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
