"""Activation ranges of an FP32 ONNX model: the largest magnitude each value reaches.

FP16 holds finite values up to 65504. Whether an activation overflows depends on the data,
not on the weights, and onnxruntime's CPU provider hides it: it runs most FP16 ops in FP32
between Casts it inserts. Measuring the original's activations in FP32 on the validation
samples tells, on any execution provider, which values FP16 cannot hold, so the FP16 pass
keeps the nodes that produce and read them in FP32 before its first conversion (the
activation-range calibration of mixed-precision tools, here used only to choose precision).

Every float value of the main graph (inputs and node outputs typed FLOAT by shape
inference) becomes a graph output of an in-memory copy of the model, which runs once per
sample. Values inside If/Loop/Scan bodies cannot be graph outputs and are not measured (the
repair ladder's probe still covers them). The run keeps every value of one sample alive at
once: its memory is the sum of the model's activations for one sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kquant_job.validate.inputs import Feed
from kquant_job.validate.runtime import iter_stream

__all__ = ["activation_ranges"]

# onnxruntime's session config key for the folder of external data when the model is
# given as bytes (onnxruntime_session_options_config_keys.h).
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def activation_ranges(
    original: Path,
    feeds: Sequence[Feed],
    feedback: dict[str, str],
    providers: Sequence[str],
    max_samples: int = 8,
) -> dict[str, float]:
    """``{value name: max |x|}`` over the finite values each float value of the main graph
    takes on the first ``max_samples`` feeds (a stream prefix when ``feedback`` is set, as
    in :func:`~kquant_job.validate.runtime.run_stream`), computed in FP32. Values that are
    never finite are absent.

    Raises RuntimeError("sample i: ...") when onnxruntime fails on a sample, and what
    onnxruntime raises when the instrumented copy does not load.
    """
    recorder = RangeRecorder(original, providers)
    recorder.record(max_samples)
    for _ in iter_stream(recorder, feeds[:max_samples], feedback):
        pass
    return recorder.ranges


class RangeRecorder:
    """A session of the FP32 original that also measures its activation ranges: every float
    value of the main graph is an extra output of an in-memory copy (optimizations off, so
    the values are those the FP16 converter sees). It runs as the original does (``run``,
    ``get_inputs`` and ``get_outputs`` show the original's outputs only), so one pass over
    the validation samples gives the reference outputs and the ranges (the issue's "one FP32
    pass"); ``ranges`` (``{value name: max |x|}``, finite values only) grows over the runs
    that :meth:`record` allows. Keeps every value of one run alive at once.

    Raises what onnxruntime raises when the instrumented copy does not load.
    """

    def __init__(self, original: Path, providers: Sequence[str]) -> None:
        """``original``: an ONNX file (its external data beside it); ``providers``:
        onnxruntime execution providers, in order."""
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(original), load_external_data=False)
        real = [o.name for o in model.graph.output]
        names = _float_values(model)
        present = {o.name for o in (*model.graph.output, *model.graph.input)}  # inputs: feeds
        for name in names:
            if name not in present:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(Path(original).parent.resolve()))
        self._session = ort.InferenceSession(
            model.SerializeToString(), sess_options=opts, providers=list(providers)
        )
        del model
        self._all = [o.name for o in self._session.get_outputs()]
        self._real, shown = real, set(real)
        self._outputs = [o for o in self._session.get_outputs() if o.name in shown]
        self._wanted = set(names)
        self._left = 0
        self.ranges: dict[str, float] = {}

    def record(self, runs: int) -> None:
        """Measure the ranges on the next ``runs`` runs (discovery's tries are not counted)."""
        self._left = runs

    def get_inputs(self) -> list[Any]:
        """The original's inputs (onnxruntime NodeArg)."""
        return self._session.get_inputs()

    def get_outputs(self) -> list[Any]:
        """The original's outputs only (onnxruntime NodeArg)."""
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        """The execution providers the session runs on."""
        return self._session.get_providers()

    def run(
        self, output_names: Sequence[str] | None, feed: dict[str, Any], options: Any = None
    ) -> list[Any]:
        """``session.run``: the original's outputs (``output_names``, default all), in order;
        ``options``: onnxruntime RunOptions."""
        values = dict(zip(self._all, self._session.run(None, feed, options), strict=True))
        if self._left > 0:
            self._left -= 1
            wanted = self._wanted
            _update(ranges=self.ranges, values={
                k: v for k, v in (*feed.items(), *values.items()) if k in wanted
            })  # fmt: skip
        return [values[n] for n in (output_names or self._real)]


def _float_values(model: Any) -> list[str]:
    """Names of the main graph's FP32 inputs and node outputs, in graph order (types from
    shape inference; values it cannot type are left out)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a help: without it only declared types count
        inferred = model
    graph = inferred.graph
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in (*graph.input, *graph.value_info, *graph.output)
        if vi.type.HasField("tensor_type")
    }
    initializers = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    names += [out for node in graph.node for out in node.output if out]
    return [n for n in dict.fromkeys(names) if types.get(n) == onnx.TensorProto.FLOAT]


def _update(ranges: dict[str, float], values: dict[str, Any]) -> None:
    for name, value in values.items():
        array = np.asarray(value)
        if array.dtype.kind != "f" or array.size == 0:
            continue
        finite = np.abs(array[np.isfinite(array)])
        if finite.size:
            ranges[name] = max(ranges.get(name, 0.0), float(finite.max()))
