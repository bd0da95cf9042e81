"""The corpus table: every model of tests/corpus, every method, kquant's pass versus a plain
library call: success, error metrics and time.

Methods and baselines (each with the defaults a user would type):

- fp16: kquant ``OnnxFp16Pass`` (activation ranges and repair ladder, validation Reference
  as probe) vs
  ``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)`` and
  ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)``;
- int8-dynamic: kquant ``OnnxInt8DynamicPass`` vs ``quantize_dynamic(in, out)``;
- int8-static: kquant ``OnnxInt8StaticPass`` vs ``quantize_static(in, out, reader)`` on the
  same calibration feeds.

Every output is checked like the worker checks it: onnxruntime CPU, 4 generated samples,
the precision's default tolerance (kquant_api.DEFAULT_TOLERANCE). "ok" = loads, runs and
passes; "tol" = runs but misses the tolerance; "noop" = INT8 output with no
quantized node (the float model under a new name); "load"/"error" = failed, with the
message.

FP16 on a CPU hides overflow (onnxruntime's CPU provider computes most FP16 ops in FP32),
so FP16 rows add ``fp16x``: the max relative error of the converted model run in onnx's
reference evaluator, which computes every op in its declared type as a GPU does ("inf" when
an output is not finite), on the first sample. kquant's FP16 probe checks that too
(relative error <= 1e-2), standing in for a probe that runs on the job's GPU.
Errors are the worst mean abs error and lowest cosine over the outputs. Time is wall
seconds of the conversion alone (kquant's includes its probe runs). Prints figures only.

    .venv/bin/python bench/bench_corpus.py [--wide] [model ...]
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus import CORPUS_NAMES, CorpusModel, build_corpus
from corpus.runs import METHODS, calibration_files, reference, run_pass

from kquant_job.passes import ProbeResult
from kquant_job.passes.int8_attempts import count_quantized
from kquant_job.validate import Reference

NOTE = 80  # characters of a note shown; --wide shows all


def _plain(model: CorpusModel, method: str, tool: str, work: Path) -> Path:
    out = work / f"{model.name}-{tool}.onnx"
    if method == "fp16":
        if tool == "onnxconverter-common":
            from onnxconverter_common.float16 import convert_float_to_float16
        else:
            from onnxruntime.transformers.float16 import convert_float_to_float16
        onnx.save(convert_float_to_float16(onnx.load(str(model.path)), keep_io_types=True), out)
        return out
    if method == "int8-dynamic":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(model.path, out)
        return out
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            files = calibration_files(model, work / "calibration")
            self.feeds = iter([dict(np.load(f)) for f in files])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    quantize_static(model.path, out, Reader())
    return out


def _row(ref: Reference, path: Path | None, seconds: float, note: str, int8: bool) -> dict:
    if path is None:
        return {"status": "error", "time": seconds, "note": note}
    result = ref.probe(path)
    if result.error:
        return {"status": "load", "time": seconds, "note": result.error}
    means = [m.get("meanAbsError") for m in result.metrics.values()]
    coses = [m.get("cosineSimilarity") for m in result.metrics.values()]
    means = [m for m in means if m is not None]
    coses = [c for c in coses if c is not None]
    status = "ok" if result.ok else "tol"
    exact = None if int8 else fp16_exact_error(ref, path)
    if status == "ok" and exact is not None and exact > 1e-2:
        status, note = "tol", f"reference evaluator error {exact:.3g}: FP16 overflow"
    if int8 and count_quantized(onnx.load(str(path)))["quantizedNodes"] == 0:
        status, note = "noop", "no node quantized: the float model"
    return {
        "status": status,
        "time": seconds,
        "mae": max(means) if means else None,
        "cos": min(coses) if coses else None,
        "fp16x": exact,
        "note": note if result.ok else "; ".join(result.violations)[:70],
    }


def measure(model: CorpusModel, method: str, work: Path) -> dict[str, dict]:
    """{tool: row} for kquant and the plain baselines of ``method``."""
    ref = reference(model, method)
    int8 = method != "fp16"
    probe = ref.probe if int8 else _exact_probe(ref)
    rows = {}
    start = time.perf_counter()
    try:
        ranges = None if int8 else ref.activation_ranges  # as the worker passes them
        result = run_pass(model, method, work / "kquant", probe, ranges)
        note = _kquant_note(method, result.details)
        rows["kquant"] = _row(ref, result.output, time.perf_counter() - start, note, int8)
    except Exception as exc:
        rows["kquant"] = _row(ref, None, time.perf_counter() - start, str(exc)[:90], int8)
    tools = ("onnxconverter-common", "onnxruntime") if method == "fp16" else ("onnxruntime",)
    for tool in tools:
        start = time.perf_counter()
        try:
            path = _plain(model, method, tool, work)
            rows[tool] = _row(ref, path, time.perf_counter() - start, "", int8)
        except Exception as exc:
            rows[tool] = _row(ref, None, time.perf_counter() - start, str(exc)[:90], int8)
    return rows


def fp16_exact_error(ref: Reference, path: Path) -> float | None:
    """Max over outputs of max |ref - got| / max(1, max |ref|) on the first sample, the
    candidate run in onnx's reference evaluator (inf when not finite; None when the
    evaluator cannot run the model)."""
    import numpy as np
    from onnx.reference import ReferenceEvaluator

    feed = ref.feeds[0]
    try:
        evaluator = ReferenceEvaluator(_sorted(onnx.load(str(path))))
        with np.errstate(all="ignore"):
            got = dict(zip(evaluator.output_names, evaluator.run(None, feed), strict=True))
    except Exception:
        return None
    worst = 0.0
    for name, want in ref.outputs[0].items():
        have = np.asarray(got[name], np.float64)
        if have.dtype.kind != "f" and np.asarray(want).dtype.kind != "f":
            continue
        if not np.isfinite(have).all():
            return float("inf")
        scale = max(1.0, float(np.abs(want).max()))
        worst = max(worst, float(np.abs(np.asarray(want, np.float64) - have).max()) / scale)
    return worst


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The main graph's nodes in dependency order (onnxruntime's converter appends its
    Casts at the end; onnxruntime sorts on load, the reference evaluator does not)."""
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    known.add("")
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)] or pending[:1]
        for node in ready:
            ordered.append(node)
            known.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(ordered)
    return copy


def _exact_probe(ref: Reference) -> Callable[[Path], ProbeResult]:
    """The validation probe, then :func:`fp16_exact_error` <= 1e-2."""

    def probe(candidate: Path) -> ProbeResult:
        result = ref.probe(candidate)
        error = fp16_exact_error(ref, candidate)
        if result.ok and error is not None and error > 1e-2:
            return ProbeResult(ok=False, violations=[f"reference evaluator: {error:.3g}"])
        return result

    return probe


def _kquant_note(method: str, details: dict) -> str:
    if method == "fp16":
        extra = len(details["nodeBlockList"])
        kept = ", ".join(details["fp32Initializers"]) or "-"
        return f"{len(details['attempts'])} attempt(s), {extra} node(s) FP32, kept: {kept}"
    last = details["attempts"][-1]["attempt"]
    return f"{last}, probePassed={details.get('probePassed')}"


def main(names: list[str]) -> None:
    corpus = build_corpus()
    head = f"{'model':22} {'method':12} {'tool':20} {'status':6} {'meanAbs':>8} {'cosine':>8}"
    head += f" {'fp16x':>8}"
    print(head + f" {'time s':>7}  note")
    for name in names or CORPUS_NAMES:
        for method in METHODS:
            with tempfile.TemporaryDirectory() as tmp:
                rows = measure(corpus[name], method, Path(tmp))
            for tool, r in rows.items():
                mae = "-" if r.get("mae") is None else f"{r['mae']:.2e}"
                cos = "-" if r.get("cos") is None else f"{r['cos']:.5f}"
                exact = "-" if r.get("fp16x") is None else f"{r['fp16x']:.1e}"
                print(
                    f"{name:22} {method:12} {tool:20} {r['status']:6} {mae:>8} {cos:>8} {exact:>8}"
                    f" {r['time']:7.2f}  {' '.join(r['note'].split())[:NOTE]}",
                    flush=True,
                )


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--wide" in args:
        args.remove("--wide")
        NOTE = 10_000
    main(args)
