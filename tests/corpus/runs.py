"""Run kquant's ONNX passes on a corpus model the way the worker does: a validation
:class:`~kquant_job.validate.Reference` on generated feeds (CPU) gives the probe, the
default tolerance of the precision applies, static INT8 calibrates on generated feeds of
another seed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from corpus.build import CorpusModel, feeds_for
from kquant_api import DEFAULT_TOLERANCE, Precision, QuantizationConfig
from kquant_job.passes import PassContext, PassResult, Probe
from kquant_job.passes.onnx_fp16 import OnnxFp16Pass
from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass
from kquant_job.passes.onnx_int8_static import OnnxInt8StaticPass
from kquant_job.validate import Reference

METHODS = ("fp16", "int8-dynamic", "int8-static")
SAMPLES = 4


def reference(model: CorpusModel, method: str) -> Reference:
    """The original's outputs on ``SAMPLES`` generated feeds, with the default tolerance of
    the method's precision."""
    precision = Precision.fp16 if method == "fp16" else Precision.int8
    return Reference(
        model.path,
        feeds_for(model, SAMPLES),
        model.config(SAMPLES),
        DEFAULT_TOLERANCE[precision],
        providers=["CPUExecutionProvider"],
    )


def calibration_files(model: CorpusModel, folder: Path) -> list[Path]:
    """``SAMPLES`` .npz feeds generated with seed 1 (validation uses seed 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, feed in enumerate(feeds_for(model, SAMPLES, seed=1)):
        path = folder / f"sample{i}.npz"
        np.savez(path, **feed)
        files.append(path)
    return files


def run_pass(
    model: CorpusModel,
    method: str,
    work: Path,
    probe: Probe | None,
    ranges: Callable[[], dict[str, float]] | None = None,
) -> PassResult:
    """Convert ``model`` with kquant's pass for ``method`` into ``work/out/<name>.onnx``
    (``ranges``: the activation ranges FP16 uses, as the worker passes them).
    Raises what the pass raises (PassError ConversionFailed...)."""
    out = work / "out" / f"{model.name}.onnx"
    if method == "fp16":
        ctx = PassContext(work_dir=work / "scratch", probe=probe, activation_ranges=ranges)
        return OnnxFp16Pass().run(model.path, QuantizationConfig(precision="fp16"), out, ctx)
    if method == "int8-dynamic":
        ctx = PassContext(work_dir=work / "scratch", probe=probe)
        config = QuantizationConfig(precision="int8", mode="dynamic")
        return OnnxInt8DynamicPass().run(model.path, config, out, ctx)
    files = calibration_files(model, work / "calibration")
    ctx = PassContext(work_dir=work / "scratch", probe=probe, calibration_files=files)
    config = QuantizationConfig.model_validate(
        {"precision": "int8", "mode": "static",
         "calibration": {"uri": "file:///calibration/", "samples": SAMPLES}}
    )  # fmt: skip
    return OnnxInt8StaticPass().run(model.path, config, out, ctx)
