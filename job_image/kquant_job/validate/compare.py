"""Compare a converted ONNX model with its original on the same feeds.

:class:`Reference` runs the original once; its :meth:`~Reference.probe` checks candidates on
the first few samples (self-repairing passes call it per attempt). :func:`validate_onnx` is
the full comparison recorded in report.json: every sample, per-output metrics
(:mod:`kquant_job.validate.metrics`), the tolerance verdict, median latency of both models
and their sizes. Outputs are compared by name, in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kquant_api import LatencyMs, Tolerance, ValidationConfig, ValidationSummary
from kquant_job.errors import InvalidSpec
from kquant_job.gain import MAX_LATENCY_RATIO, MIN_LATENCY_RUNS, slower
from kquant_job.passes.base import ProbeResult
from kquant_job.validate.decisions import compare_decisions
from kquant_job.validate.inputs import Feed
from kquant_job.validate.interleaved import block_runs, interleaved_ratio
from kquant_job.validate.metrics import (
    OutputMetrics,
    check_output_names,
    check_tolerance,
    compare_output,
)
from kquant_job.validate.runtime import (
    block_latency_ms,
    device_of,
    make_session,
    model_bytes,
    paired_latency_ms,
    release_memory,
    run_stream,
    select_providers,
    session_call,
    short,
)

# Samples the activation ranges are measured on (a stream prefix with feedback).
RANGE_SAMPLES = 8

__all__ = ["Reference", "ValidationOutcome", "run_stream", "select_providers", "validate_onnx"]

Outputs = list[dict[str, np.ndarray]]


def compare_outputs(
    original: Outputs, converted: Outputs, decisions: dict[str, Any] | None = None
) -> list[OutputMetrics]:
    """Metrics per original output (in the original's order) over the samples both lists
    hold; an output the converted model lacks is reported ``missing``. ``decisions`` (output
    name -> DecisionRule) adds decision metrics to those outputs."""
    if not original:
        return []
    n = min(len(original), len(converted))
    metrics = []
    for name in original[0]:
        if not converted or name not in converted[0]:
            metrics.append(OutputMetrics(name=name, exact=False, missing=True))
            continue
        a, b = [o[name] for o in original[:n]], [c[name] for c in converted[:n]]
        m = compare_output(name, a, b)
        rule = (decisions or {}).get(name)
        if rule is not None and not m.shapeMismatches:
            m.decision = compare_decisions(rule, a, b)
        metrics.append(m)
    return metrics


# A reference session of a model past this many bytes (file plus external data) is released
# once its outputs are computed: the conversion would otherwise run beside it (its weights
# held twice at the peak); the latency runs make it again (one session load, ~0.5 s for
# BERT-base, bench/bench_job.py).
KEEP_SESSION_BYTES = 64 * 2**20


class Reference:
    """The original model's outputs on ``feeds``, computed once at construction.

    ``providers`` defaults to :func:`select_providers` ("auto"). Raises PassError(CorruptModel)
    when the original does not load, InvalidSpec when there are no feeds, when it cannot run
    on them (wrong shapes or values: fix spec.validation.inputs/dimensions or the data) or
    when the feedback names are not the model's. ``session``: a session of ``original`` on
    ``providers`` already made (it is used, not made again), possibly a
    :class:`~kquant_job.validate.ranges.RangeRecorder`. ``ranges``: measure the activation
    ranges in the same pass (a RangeRecorder is made when ``session`` is not one and the
    model file holds at most KEEP_SESSION_BYTES: a larger embedded model would be held
    three times, and its ranges are measured later on a copy with a data file).
    """

    def __init__(
        self,
        original: Path,
        feeds: Sequence[Feed],
        cfg: ValidationConfig,
        tolerance: Tolerance,
        providers: Sequence[str] | None = None,
        *,
        session: Any | None = None,
        ranges: bool = False,
    ) -> None:
        from kquant_job.validate.ranges import RangeRecorder

        self.original = Path(original)
        self.feeds = list(feeds)
        self.cfg = cfg
        self.tolerance = tolerance
        if not self.feeds:
            raise InvalidSpec(f"no validation samples for {self.original.name}")
        self.providers = list(providers) if providers else select_providers()[0]
        if session is None and ranges:
            session = recorder_or_none(self.original, self.providers)
        session = session or make_session(self.original, self.providers)
        recorder = session if isinstance(session, RangeRecorder) else None
        self.device = device_of(session)
        if recorder is not None:
            recorder.record(RANGE_SAMPLES)
        try:
            self.outputs: Outputs = run_stream(session, self.feeds, cfg.feedback)
        except RuntimeError as exc:
            raise InvalidSpec(
                f"the original model {self.original.name} fails on the validation inputs "
                f"({exc}); set spec.validation.inputs / dimensions or check dataUri"
            ) from exc
        if self.outputs:
            check_output_names(tolerance, list(self.outputs[0]), self.original.name)
        # Ranges measured in this pass; None: measured on request (activation_ranges).
        self.ranges: dict[str, float] | None = recorder.ranges if recorder else None
        # On the CPU the original's latency block is timed now, on this session (a plain
        # one: a recorder's graph is unoptimized, not what a user runs): validation then
        # needs no second FP32 session (0.5 s for BERT-base), nor does each variant.
        self.latency: tuple[float, int] | None = None
        if recorder is None and self.sequential:
            self.latency = self._block(session)
        # The session for the latency runs: a recorder's graph is unoptimized (not what a
        # user runs) and a large model's weights would sit beside the conversion.
        keep = recorder is None and model_bytes(self.original) <= KEEP_SESSION_BYTES
        self._session: Any | None = session if keep and self.latency is None else None
        self._kept: tuple[tuple[int, ...], Any] | None = None
        self._small_model: bool | None = None

    @classmethod
    def from_outputs(
        cls,
        original: Path,
        feeds: Sequence[Feed],
        cfg: ValidationConfig,
        tolerance: Tolerance,
        providers: Sequence[str],
        outputs: Outputs,
        ranges: dict[str, float] | None,
        device: str,
        latency: tuple[float, int] | None = None,
    ) -> Reference:
        """A reference from a pass already run (another variant's, read back): nothing is
        run now; ``latency``: the original's latency block that pass timed (median ms,
        runs), else the latency session is made on first use."""
        ref = cls.__new__(cls)
        ref.original, ref.feeds, ref.cfg = Path(original), list(feeds), cfg
        ref.tolerance, ref.providers = tolerance, list(providers)
        ref.outputs, ref.ranges, ref.device = list(outputs), ranges, device
        ref.latency = latency
        ref._session = None
        ref._kept = None
        ref._small_model = None
        return ref

    @property
    def sequential(self) -> bool:
        """Whether latency is timed one model after the other: on the CPU. onnxruntime's
        intra-op threads spin for a while after each run, so two CPU sessions timed in
        alternation each wait on the other's spinning threads (BERT-base on 2 cores: 61 ms
        each in alternation, 34 and 31 ms one after the other: docs/architecture.md). GPU
        sessions are timed in alternation."""
        return self.providers == ["CPUExecutionProvider"]

    def release(self) -> None:
        """Drop the original's session (made again on use) and return its memory."""
        self._session = None
        release_memory()

    @property
    def session(self) -> Any:
        """The original's session on ``providers`` for the latency runs (made on first use
        when the reference pass did not keep its own)."""
        if self._session is None:
            self._session = make_session(self.original, self.providers)
        return self._session

    def activation_ranges(
        self, model: Path | None = None, max_samples: int = RANGE_SAMPLES
    ) -> dict[str, float]:
        """``{value name: max |x|}`` of the original's FP32 values on the first
        ``max_samples`` samples: those measured in the reference pass when it recorded them,
        else measured now (:func:`kquant_job.validate.ranges.activation_ranges`) on ``model``
        when given: a copy of the original holding the same values (its weights moved to a
        data file, which a session reads tensor by tensor)."""
        from kquant_job.validate.ranges import activation_ranges

        if self.ranges is not None:
            return dict(self.ranges)
        n = min(max_samples, len(self.feeds))
        source = model or self.original
        return activation_ranges(source, self.feeds[:n], self.cfg.feedback, self.providers)

    def probe(
        self, candidate: Path, max_samples: int = 8, *, timed: bool = False, keep: bool = False
    ) -> ProbeResult:
        """Check ``candidate`` on the first ``max_samples`` samples (a stream prefix when
        feedback is set). Never raises: a load or run failure gives ``ok=False`` with the
        runtime's message in ``error``; a broken tolerance gives ``ok=False`` with
        ``violations``. With decision rules every sample is used: decisions (speech
        segments) may first change past a stream's first samples. ``timed``: a candidate
        within tolerance is timed against the original as validation times it
        (:meth:`latency_of`), in ``latency`` and ``slower``. ``keep``: the session of an
        untimed candidate within tolerance is kept for :meth:`take_session` (not by default:
        a kept session stays in memory until validation: INT8 keeps its candidate's, FP16
        does not, as its session held from the probe took the job's peak from 1.9x the
        model's bytes to 2.2x)."""
        n = len(self.feeds) if self.tolerance.decisions else min(max_samples, len(self.feeds))
        self.drop_kept()  # an earlier candidate's: this one replaces it
        try:
            session = make_session(candidate, self.providers)
        except Exception as exc:
            return ProbeResult(ok=False, error=f"load failed: {short(exc)}")
        try:
            outputs = run_stream(session, self.feeds[:n], self.cfg.feedback)
        except Exception as exc:
            return ProbeResult(ok=False, error=f"run failed: {short(exc)}")
        metrics = compare_outputs(self.outputs[:n], outputs, self.tolerance.decisions)
        violations = check_tolerance(metrics, self.tolerance)
        result = ProbeResult(
            ok=not violations,
            violations=violations,
            metrics={m.name: m.to_dict() for m in metrics},
        )
        if timed and result.ok:
            del outputs
            held = [session]
            del session
            try:
                lat = self.latency_of(candidate, held, confirm=True)
            except Exception:  # it ran on every sample above: validation says what fails
                return result
            result.latency = lat
            result.slower = slower(lat["original"], lat["quantized"], int(lat["runs"]),
                                   lat.get("interleavedRatio"))  # fmt: skip
        elif result.ok and keep:
            self._kept = (file_key(candidate), session)
        return result

    def take_session(self, converted: Path) -> Any | None:
        """The session the last probe made, if it was of ``converted`` as it is now (the
        same file and data file, :func:`file_key`: a pass moves its chosen candidate into
        place), else None; either way none is kept after. Validation then loads the
        converted model once, not twice (0.3-0.8 s for BERT-base)."""
        kept, self._kept = self._kept, None
        if kept is None or kept[0] != file_key(converted):
            return None
        return kept[1]

    def drop_kept(self) -> None:
        """Forget the last probe's session (a stage converting several models keeps none
        beside the next conversion)."""
        if self._kept is not None:
            self._kept = None
            release_memory()

    def latency_of(self, candidate: Path, held: list[Any], *, confirm: bool) -> dict[str, Any]:
        """``{"original": ms, "quantized": ms, "runs": n, "timing": ...}``: medians of the
        candidate and of the original on the first feed, on validation's settings
        (``cfg.latencyRuns`` after ``cfg.warmupRuns`` within ``cfg.latencyBudgetMs``, or
        fewer once the median is known to ``cfg.latencyPrecision``).
        ``held``: a one-item list holding the candidate's open session (``candidate``'s), emptied
        here so that the session is released before the original's runs: on the CPU it can
        hold FP32 copies of its weights, and the two side by side would hold a large model's
        weights twice over.

        On the CPU (:attr:`sequential`) the two are timed one after the other, half the
        budget each (``timing: sequential``); the original's block is the reference pass's
        (``latency``: timed once, kept for every variant). With ``confirm``, a result past
        MAX_LATENCY_RATIO times the original's median is timed again: a model of at most
        KEEP_SESSION_BYTES timed at least MIN_LATENCY_RUNS times, whose blocks fit in a
        quarter of the latency budget, in blocks of each model in turn (``interleavedRatio``,
        ``interleavedRuns``: :mod:`kquant_job.validate.interleaved`; a ratio past
        MAX_LATENCY_RATIO measured twice, the lower kept), which the gain rule then judges
        alone; another one, when it counts as slower (:func:`kquant_job.gain.slower`), both
        models once more, each keeping its faster median (a large model's two sessions are
        never held at once). On a busy machine one round of a sub-millisecond model moved
        between 0.5x and 1.5x of the original, and a verdict must not rest on that.
        Elsewhere the two are timed in alternation (:func:`paired_latency_ms`). ``runs``:
        the fewer of the two. Raises what ``session.run`` or loading ``candidate`` raises."""
        cfg, feed = self.cfg, self.feeds[0]
        if not self.sequential:
            return paired_latency_ms(
                session_call(self.session, feed), session_call(held.pop(), feed),
                cfg.latencyRuns, cfg.warmupRuns, cfg.latencyBudgetMs, cfg.latencyPrecision,
            )  # fmt: skip
        session: Any = held.pop()
        quantized, q_runs = self._block(session)
        small = confirm and self._small()  # kept for a confirming timing beside the original
        if not small:
            session = None
            release_memory()
        if self.latency is None:
            self.latency = self._time_original()
        original, o_runs = self.latency
        suspect = original > 0 and quantized / original > MAX_LATENCY_RATIO
        # Two tries within half the budget (the other half timed the medians); not for a spec
        # timing fewer than MIN_LATENCY_RUNS runs, whose few-runs rule stands.
        runs = block_runs(original + quantized, cfg.latencyBudgetMs / 4)
        if small and suspect and runs and min(q_runs, o_runs) >= MIN_LATENCY_RUNS:
            calls = session_call(self.session, feed), session_call(session, feed)
            ratio, n = interleaved_ratio(*calls, runs)
            if ratio > MAX_LATENCY_RATIO:  # a burst of load may span blocks: the lower counts
                again, more = interleaved_ratio(*calls, runs)
                ratio, n = min(ratio, again), n + more
            del session, calls
            self.release()
            return {
                "original": original,
                "quantized": quantized,
                "runs": min(q_runs, o_runs),
                "timing": "sequential",
                "interleavedRatio": ratio,
                "interleavedRuns": n,
            }
        del session
        if confirm and slower(original, quantized, min(q_runs, o_runs)):
            again = make_session(candidate, self.providers)
            q2, q2_runs = self._block(again)
            del again
            release_memory()
            o2, o2_runs = self._time_original()
            quantized, q_runs = min(quantized, q2), min(q_runs, q2_runs)
            original, o_runs = min(original, o2), min(o_runs, o2_runs)
        return {"original": original, "quantized": quantized, "runs": min(q_runs, o_runs),
                "timing": "sequential"}  # fmt: skip

    def _small(self) -> bool:
        """Whether the original's files hold at most KEEP_SESSION_BYTES: its session and a
        converted one may then be held at once."""
        if self._small_model is None:
            self._small_model = model_bytes(self.original) <= KEEP_SESSION_BYTES
        return self._small_model

    def _block(self, session: Any) -> tuple[float, int]:
        """(median ms, runs) of ``session`` on the first feed: one model's block of a
        sequential timing, on validation's settings with half the latency budget."""
        cfg = self.cfg
        return block_latency_ms(
            session_call(session, self.feeds[0]), cfg.latencyRuns, cfg.warmupRuns,
            cfg.latencyBudgetMs / 2, cfg.latencyPrecision,
        )  # fmt: skip

    def _time_original(self) -> tuple[float, int]:
        """:meth:`_block` of the original; its session is released after."""
        timed = self._block(self.session)
        self.release()
        return timed


def file_key(path: Path) -> tuple[int, ...]:
    """Device, inode, size and mtime (ns) of ``path`` and of its ``<name>.data`` beside it
    when there is one (kquant's external data file): the same key, the same bytes, as far
    as kquant's own moves and renames go. Empty when ``path`` is gone."""
    key: list[int] = []
    for file in (Path(path), Path(f"{path}.data")):
        try:
            st = file.stat()
        except OSError:
            if file == Path(path):
                return ()
            continue
        key += [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    return tuple(key)


# How much of a model's outputs the report lists (a TorchScript module's dict output names
# its own outputs: 200 000 of them made an 11 MB report and log).
MAX_REPORTED_OUTPUTS, MAX_NAME_CHARS = 256, 256


def _cut_name(name: str) -> str:
    """``name``, or past MAX_NAME_CHARS its start and a digest of the whole (names stay
    distinct)."""
    if len(name) <= MAX_NAME_CHARS:
        return name
    import hashlib

    digest = hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()[:12]
    return f"{name[: MAX_NAME_CHARS - 16]}...{digest}"


@dataclass
class ValidationOutcome:
    """The full comparison of one converted model with its original.

    ``latency_ms``: ``{"original": ms, "quantized": ms, "runs": n}``, medians over n timed
    runs each (None when the converted model did not run); sizes in bytes include external
    data files; ``error`` holds the runtime's message when the converted model failed to
    load or run (then ``passed`` is False and ``violations`` says so).
    """

    passed: bool
    samples: int
    device: str
    provider: str
    metrics: dict[str, OutputMetrics]
    violations: list[str]
    tolerance: Tolerance
    original_bytes: int
    quantized_bytes: int
    latency_ms: dict[str, float] | None = None  # original, quantized (ms), runs
    feedback: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def _float_metrics(self, key: str) -> list[float]:
        return [
            getattr(m, key)
            for m in self.metrics.values()
            if not m.exact and getattr(m, key) is not None
        ]

    def summary(self) -> ValidationSummary:
        """The compact summary for the termination message: worst values over float outputs
        (largest max/mean abs error, smallest cosine)."""
        max_abs = self._float_metrics("maxAbsError")
        mean_abs = self._float_metrics("meanAbsError")
        cos = self._float_metrics("cosineSimilarity")
        return ValidationSummary(
            passed=self.passed,
            samples=self.samples,
            device=self.device,
            maxAbsError=max(max_abs) if max_abs else None,
            meanAbsError=max(mean_abs) if mean_abs else None,
            cosineSimilarity=min(cos) if cos else None,
            latencyMs=LatencyMs(**self.latency_ms) if self.latency_ms else None,
        )

    def to_report(self) -> dict[str, Any]:
        """Everything for report.json (camelCase keys, plain JSON types)."""
        report: dict[str, Any] = {
            "passed": self.passed,
            "samples": self.samples,
            "device": self.device,
            "provider": self.provider,
            "tolerance": self.tolerance.wire(),
            "outputs": {
                _cut_name(name): m.to_dict()
                for name, m in list(self.metrics.items())[:MAX_REPORTED_OUTPUTS]
            },
            "violations": self.violations[:MAX_REPORTED_OUTPUTS],
            "latencyMs": dict(self.latency_ms) if self.latency_ms else None,
            "originalBytes": self.original_bytes,
            "quantizedBytes": self.quantized_bytes,
        }
        if len(self.metrics) > MAX_REPORTED_OUTPUTS:  # a model's outputs are its author's
            report["outputsOmitted"] = len(self.metrics) - MAX_REPORTED_OUTPUTS
        if len(self.violations) > MAX_REPORTED_OUTPUTS:
            report["violationsOmitted"] = len(self.violations) - MAX_REPORTED_OUTPUTS
        if self.feedback:
            report["feedback"] = dict(self.feedback)
        if self.error:
            report["error"] = self.error
        return report


def recorder_or_none(original: Path, providers: Sequence[str]) -> Any | None:
    """A :class:`~kquant_job.validate.ranges.RangeRecorder` of ``original`` on
    ``providers``, or None when its file is past KEEP_SESSION_BYTES (embedded weights would
    be held three times) or the instrumented copy does not load (a plain session then says
    why, and the ranges are measured apart)."""
    from kquant_job.validate.ranges import RangeRecorder

    if Path(original).stat().st_size > KEEP_SESSION_BYTES:
        return None
    try:
        return RangeRecorder(original, providers)
    except Exception:
        return None


def validate_onnx(
    original: Path,
    converted: Path,
    feeds: Sequence[Feed],
    cfg: ValidationConfig,
    tolerance: Tolerance,
    providers: Sequence[str] | None = None,
    *,
    reference: Reference | None = None,
    confirm_slowdown: bool = False,
) -> ValidationOutcome:
    """Compare ``converted`` with ``original`` on every feed.

    ``reference`` (optional) reuses a :class:`Reference` already built for ``original``, so
    the original is not run twice; its feeds and providers are then used and ``feeds`` and
    ``providers`` are ignored. Latency: :meth:`Reference.latency_of` after the converted
    model's outputs are compared (``confirm_slowdown``: a conversion whose gain is judged on
    latency, kquant_job.gain, has a slowdown timed again).

    Raises what :class:`Reference` raises for the original. Problems of the converted model
    (load or run failure, tolerance) never raise: they give ``passed=False``.
    """
    ref = reference or Reference(original, feeds, cfg, tolerance, providers)
    common: dict[str, Any] = dict(
        samples=len(ref.feeds),
        device=ref.device,
        tolerance=tolerance,
        original_bytes=model_bytes(Path(original)),
        quantized_bytes=model_bytes(Path(converted)),
        feedback=dict(cfg.feedback),
    )
    stage = "load"
    try:
        session = ref.take_session(Path(converted)) or make_session(Path(converted), ref.providers)
        stage = "run"
        outputs = run_stream(session, ref.feeds, cfg.feedback)
    except Exception as exc:
        error = f"converted model failed to {stage}: {short(exc)}"
        return ValidationOutcome(
            passed=False,
            provider=ref.providers[0],
            metrics={},
            violations=[error],
            error=error,
            **common,
        )
    metrics = compare_outputs(ref.outputs, outputs, tolerance.decisions)
    violations = check_tolerance(metrics, tolerance)
    provider = session.get_providers()[0]
    del outputs
    held = [session]
    del session
    latency = ref.latency_of(Path(converted), held, confirm=confirm_slowdown)
    return ValidationOutcome(
        passed=not violations,
        provider=provider,
        metrics={m.name: m for m in metrics},
        violations=violations,
        latency_ms=latency,
        **common,
    )
