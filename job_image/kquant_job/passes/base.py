"""The pass interface: one quantization method per module.

A pass takes one model file, a :class:`~kquant_api.QuantizationConfig` and an output path, and
returns a :class:`PassResult` whose ``details`` go into report.json (block lists, what was
tried, pre-processing status). Passes that repair themselves use ``ctx.probe`` to check a
candidate against the original.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from kquant_api import ModelFormat, QuantizationConfig


@dataclass
class ProbeResult:
    """Outcome of checking a candidate model against the original.

    ``ok`` is False when the candidate failed to load or run (``error`` holds the runtime's
    message) or when a tolerance was exceeded (``violations`` lists them, e.g.
    ``"output: maxAbsError 0.3 > 0.01"``). ``metrics`` maps output name to its metrics.
    ``latency`` (a timed probe of a candidate within tolerance): ``{"original": ms,
    "quantized": ms, "runs": n}``, medians on the first sample; ``slower``: whether that
    counts as slower than the original by the gain rule (:func:`kquant_job.gain.slower`).
    """

    ok: bool
    error: str | None = None
    violations: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    latency: dict[str, float] | None = None
    slower: bool = False


class Probe(Protocol):
    """Checks a candidate file against the original on a few samples; ``timed``: a
    candidate within tolerance is also timed against the original (``ProbeResult.latency``);
    ``keep``: a candidate within tolerance keeps its session for validation, which loads it
    no second time while the file stays the same (for a pass whose chosen candidate is moved
    into place with nothing heavy done after the probe: the session stays in memory)."""

    def __call__(
        self, candidate: Path, *, timed: bool = False, keep: bool = False
    ) -> ProbeResult: ...


@dataclass
class PassContext:
    """What a pass may use besides its input: a scratch directory, an optional probe (None
    when validation is disabled), the original's activation ranges on the validation
    samples (``{value name: max |x|}``, measured on call, optionally on a given copy of the
    original with the same values; None when validation is disabled or the model cannot
    run), local calibration samples (``.npz`` files) for static
    quantization, and a logger."""

    work_dir: Path
    probe: Probe | None = None
    activation_ranges: Callable[..., dict[str, float]] | None = None
    calibration_files: list[Path] = field(default_factory=list)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("kquant"))


@dataclass
class PassResult:
    """The converted model file (external data files, if any, sit beside it) and the
    details recorded in the report."""

    output: Path
    details: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    """A quantization method."""

    name: ClassVar[str]
    formats: ClassVar[frozenset[ModelFormat]]

    def run(
        self, model_in: Path, config: QuantizationConfig, out_path: Path, ctx: PassContext
    ) -> PassResult:
        """Convert ``model_in`` into ``out_path``. Raises PassError (CorruptModel,
        ConversionFailed) with what was tried."""
        ...
