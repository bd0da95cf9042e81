"""A whole job against the work it cannot avoid, per stage, with peak memory: FP16 and INT8
dynamic of a BERT-base encoder (transformers' default BertConfig: 110 M parameters, 436 MB
FP32, random weights, exported to ONNX by kquant), weights embedded in the .onnx and as
external data.

- **whole job**: ``kquant-job run`` (the worker's entry point) on a ``file://`` model and
  output, one validation sample, the default latency settings; wall time of the process and
  the stages of its report.json (``timingsMs``).
- **unavoidable work**: onnxruntime's own converter (``float16.convert_float_to_float16``
  with keep_io_types, or ``quantize_dynamic``): load, convert, save; then one FP32 and one
  converted InferenceSession, each created and run once on the same sample.
- **peak RSS**: of each process tree (the worker and its sandboxed child; the converter's
  process), ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` read by a wrapper process, as a ratio of
  the model's bytes.

With several methods it also runs them as the variants of one job (spec.variants) and
prints that job's time against the single jobs'. Prints figures only, ratios from this one
run (the issue's goals: whole/unavoidable <= 1.3x
for FP16 and <= 1.5x for INT8; peak RSS <= 2.0x the model).

    .venv/bin/python bench/bench_job.py [--layers 12] [--hidden 768] [--methods fp16,int8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs a command as its child and prints the child tree's peak RSS (bytes) and wall time (s).
WRAP = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
wall = time.perf_counter() - start
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, wall)
"""

# The unavoidable work: onnxruntime's converter, then one session of each model run once.
BASELINE = """
import sys, numpy as np, onnx, onnxruntime as ort
src, out, method, external = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if method == "fp16":
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    onnx.save(model, out, save_as_external_data=external)
    del model
else:
    from onnxruntime.quantization import quantize_dynamic
    quantize_dynamic(src, out, use_external_data_format=external)
ids = np.ones((1, 128), np.int64)
for path in (src, out):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    s.run(None, {"input_ids": ids, "attention_mask": ids})
    del s
"""


def build(work: Path, layers: int, hidden: int) -> tuple[Path, Path]:
    """BERT (random weights) exported by kquant to ``work/embedded/model.onnx``, and the same
    model with its weights as external data in ``work/external/``."""
    import onnx
    import torch
    from transformers import BertConfig, BertModel

    from kquant_job.hf_folder import read_hf_folder
    from kquant_job.passes.transformers_export import export_onnx

    folder = work / "hf"
    heads = max(1, hidden // 64)
    config = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                        intermediate_size=4 * hidden)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(folder)
    hf = read_hf_folder(folder)
    assert hf is not None
    embedded = work / "embedded" / "model.onnx"
    export_onnx(folder, hf, embedded)
    external = work / "external" / "model.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(str(embedded)), str(external), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)  # fmt: skip
    return embedded, external


def measured(cmd: list[str]) -> tuple[int, int, float]:
    """(exit code, peak RSS bytes of the command's process tree, wall seconds)."""
    out = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    return int(out[0]), int(out[1]), float(out[2])


# INT8 is measured whatever it gains (NoGain would end the job before publishing).
GAIN = {"int8": {"requireGain": False}}


def run_job(model: Path, method: str, work: Path) -> tuple[float, int, dict[str, float]]:
    """The worker on ``model``: wall seconds, peak RSS bytes, report.json's stage timings.
    ``method``: one precision, or several joined by '+' (one job with spec.variants)."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"out-{method}"
    # external data travels with its folder: the prefix is the model
    external = any(p.suffix == ".data" for p in model.parent.iterdir())
    source = f"file://{model.parent}/" if external else f"file://{model}"
    spec = {
        "apiVersion": "kquant.io/v1alpha1", "kind": "QuantizationJob",
        "metadata": {"name": f"bench-{method}"},
        "spec": {
            "model": {"uri": source}, "output": {"uri": f"file://{out}/"},
            "validation": {"samples": 1},
        },
    }  # fmt: skip
    configs = [{"precision": m, **GAIN.get(m, {})} for m in method.split("+")]
    if len(configs) == 1:
        spec["spec"]["quantization"] = configs[0]
    else:
        spec["spec"]["variants"] = configs
    job = work / f"job-{method}.yaml"
    job.write_text(json.dumps(spec))
    result = work / f"result-{method}.json"
    cmd = [sys.executable, "-m", "kquant_job.cli", "run", str(job), "--result-file", str(result),
           "--work-dir", str(work / f"work-{method}")]  # fmt: skip
    code, rss, wall = measured(cmd)
    data = json.loads(result.read_text())
    if code != 0:
        raise SystemExit(f"the {method} job failed: {data.get('reason')}: {data.get('message')}")
    report = json.loads(Path(data["reportUri"].removeprefix("file://")).read_text())
    return wall, rss, report["timingsMs"]


def baseline(model: Path, method: str, work: Path, external: bool) -> tuple[float, int]:
    """onnxruntime's converter and one session of each model: wall seconds, peak RSS."""
    out = work / f"baseline-{method}-{int(external)}" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    code, rss, wall = measured([sys.executable, "-c", BASELINE, str(model), str(out), method,
                                "1" if external else "0"])  # fmt: skip
    if code != 0:
        raise SystemExit(f"the {method} baseline failed (exit {code})")
    return wall, rss


def model_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.parent.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="encoder layers")
    parser.add_argument("--hidden", type=int, default=768, help="hidden size")
    parser.add_argument("--methods", default="fp16,int8", help="comma-separated")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kquant-job-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        models = dict(zip(("embedded", "external"), build(work, args.layers, args.hidden),
                          strict=True))  # fmt: skip
        size = model_bytes(models["embedded"])
        print(f"BERT {args.layers} layers, hidden {args.hidden}: {size / 2**20:.0f} MiB FP32 "
              f"(built in {time.perf_counter() - t0:.0f} s)")  # fmt: skip
        print(f"{'method':<7}{'weights':<10}{'job s':>8}{'floor s':>9}{'ratio':>7}"
              f"{'job RSS':>9}{'floor RSS':>10}  stages (s)")  # fmt: skip
        singles: dict[str, float] = {}
        for method in args.methods.split(","):
            for kind, model in models.items():
                wall, rss, stages = run_job(model, method, work / f"{method}-{kind}")
                if kind == "embedded":
                    singles[method] = wall
                floor, floor_rss = baseline(model, method, work, kind == "external")
                text = ", ".join(f"{k} {v / 1000:.1f}" for k, v in stages.items())
                print(f"{method:<7}{kind:<10}{wall:>8.2f}{floor:>9.2f}{wall / floor:>6.2f}x"
                      f"{rss / size:>8.2f}x{floor_rss / size:>9.2f}x  {text}")  # fmt: skip
        if len(singles) > 1:  # the same conversions as variants of one job
            wall, rss, stages = run_job(models["embedded"], "+".join(singles), work / "variants")
            alone = sum(singles.values())
            print(f"{len(singles)} variants in one job: {wall:.1f} s, {len(singles)} single jobs: "
                  f"{alone:.1f} s ({wall / alone:.2f}x; peak RSS {rss / size:.2f}x)")  # fmt: skip
    print("ratio: whole job / unavoidable work; RSS: peak of the process tree / model bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
