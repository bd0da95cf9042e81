"""FP32 vs FP16 (and INT8 dynamic) on onnxruntime's CUDA execution provider, for Silero VAD
and a BERT-base-size encoder: latency (batch 1) and throughput (batch --batch), each as a
ratio of FP32's measured in the same run, and every node the session placed on the CPU
provider (a silent fallback is where an FP16 gain disappears).

Conversions are kquant's own passes (FP16 with keep_io_types, INT8 dynamic), without
validation: this measures speed. The BERT model is transformers' BertModel at its default
config (12 layers, hidden 768: 110 M parameters, 436 MB FP32) with random weights, exported
by kquant's export (kquant_job.passes.transformers_export). Node placement comes from
onnxruntime's profiler (each node event's ``provider``); Memcpy nodes, which the provider
inserts to move tensors, are not counted.

Without an NVIDIA GPU (onnxruntime offers no CUDAExecutionProvider, or a CUDA session falls
back to the CPU) it prints why and exits 0. With one, it prints the device (nvidia-smi's
name, driver, memory) and the table, and --json writes the figures.

    .venv/bin/python bench/bench_gpu.py [--runs 200] [--batch 16] [--json gpu.json]
                                        [--models silero_vad,bert_base]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CUDA = "CUDAExecutionProvider"


def cuda_unavailable() -> str | None:
    """Why the CUDA provider cannot run here, or None when it can."""
    import onnxruntime as ort

    offered = ort.get_available_providers()
    if CUDA not in offered:
        return (
            f"onnxruntime {ort.__version__} offers {', '.join(offered)}: the GPU benchmark "
            "needs onnxruntime-gpu (the worker image's) and an NVIDIA GPU"
        )
    try:
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), providers=[CUDA])
    except Exception as exc:  # the provider's load errors have no common type
        return f"a CUDA session does not start: {exc}"
    if CUDA not in session.get_providers():
        return "a CUDA session fell back to the CPU provider (no device visible)"
    return None


def device() -> dict[str, str]:
    """The GPU as nvidia-smi names it (name, driver, memory), when nvidia-smi is there."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"name": "unknown (no nvidia-smi)"}
    query = "name,driver_version,memory.total"
    out = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
    fields = [*(out.splitlines() or [""])[0].split(", "), "", "", ""][:3]
    return dict(zip(("name", "driver", "memory"), (f.strip() for f in fields), strict=True))


def cpu_nodes(profile: Path) -> list[str]:
    """``"<name> (<op>)"`` of each node the profile shows run by the CPU provider, Memcpy
    nodes left out, in first-run order."""
    events = json.loads(profile.read_text())
    seen: dict[str, None] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or args.get("provider") != "CPUExecutionProvider":
            continue
        op = args.get("op_name", "?")
        if op.startswith("Memcpy"):
            continue
        seen[f"{event['name'].removesuffix('_kernel_time')} ({op})"] = None
    return list(seen)


def measure(path: Path, feed: dict[str, np.ndarray], runs: int, profile_dir: Path) -> dict:
    """Median and p90 latency (ms) of ``runs`` runs after 10 warm-up runs on the CUDA
    provider (CPU as fallback), and the nodes placed on the CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_dir / path.stem)
    session = ort.InferenceSession(str(path), options, providers=[CUDA, "CPUExecutionProvider"])
    for _ in range(10):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    placed = cpu_nodes(Path(session.end_profiling()))
    return {"medianMs": float(np.median(times)), "p90Ms": float(np.percentile(times, 90)),
            "cpuNodes": placed}  # fmt: skip


def silero(work: Path, batch: int) -> tuple[Path, dict, dict]:
    """Silero VAD's ONNX file, a batch-1 feed (576 samples of 16 kHz speech: 512 + 64 of
    context) and a batch feed (``--batch`` streams at once)."""
    import silero_vad

    from kquant_job.validate.discover import speech_clip

    src = Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"
    path = work / "silero_vad.onnx"
    shutil.copyfile(src, path)
    clip = speech_clip()[:576].astype(np.float32)

    def feed(batch: int) -> dict:
        return {"input": np.tile(clip, (batch, 1)), "state": np.zeros((2, batch, 128), np.float32),
                "sr": np.array(16000, np.int64)}  # fmt: skip

    return path, feed(1), feed(batch)


def bert(work: Path, batch: int) -> tuple[Path, dict, dict]:
    """BERT-base (random weights) exported to ONNX, batch-1 and batch feeds of 128 tokens."""
    import torch
    from transformers import BertConfig, BertModel

    from kquant_job.hf_folder import read_hf_folder
    from kquant_job.passes.transformers_export import export_onnx

    folder = work / "bert-base"
    torch.manual_seed(0)
    BertModel(BertConfig()).eval().save_pretrained(folder)
    hf = read_hf_folder(folder)
    assert hf is not None
    path = work / "bert_base.onnx"
    export_onnx(folder, hf, path)
    rng = np.random.default_rng(0)

    def feed(batch: int) -> dict:
        ids = rng.integers(0, 30522, (batch, 128), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    return path, feed(1), feed(batch)


def convert(path: Path, precision: str, work: Path) -> Path:
    """kquant's FP16 (keep_io_types) or INT8 dynamic pass on ``path``, no validation."""
    from kquant_api import ModelFormat, QuantizationConfig
    from kquant_job.passes import PassContext, select_pass

    config = QuantizationConfig.model_validate({"precision": precision})
    out = work / f"{path.stem}_{precision}.onnx"
    ctx = PassContext(work_dir=work / f"scratch-{path.stem}-{precision}")
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    select_pass(ModelFormat.onnx, config).run(path, config, out, ctx)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs at batch 1")
    parser.add_argument("--batch", type=int, default=16, help="batch size for throughput")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--models", default="silero_vad,bert_base", help="comma-separated")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = cuda_unavailable()
    if why:
        print(f"no GPU: {why}; nothing measured")
        return 0
    gpu = device()
    print(f"device: {gpu.get('name')} (driver {gpu.get('driver', '?')}, {gpu.get('memory', '?')})")
    report: dict[str, Any] = {"device": gpu, "runs": args.runs, "batch": args.batch, "models": {}}
    header = f"{'model':<12}{'precision':<10}{'latency ms':>11}{'x fp32':>8}{'items/s':>10}"
    print(header + f"{'x fp32':>8}  nodes on CPU")
    with tempfile.TemporaryDirectory(prefix="kquant-gpu-") as tmp:
        work = Path(tmp)
        builds = {"silero_vad": silero, "bert_base": bert}
        for name in args.models.split(","):
            build = builds[name]
            path, one, many = build(work, args.batch)
            rows: dict[str, dict] = {}
            for precision in ("fp32", "fp16", "int8"):
                model = path if precision == "fp32" else convert(path, precision, work)
                single = measure(model, one, args.runs, work)
                batch = measure(model, many, max(args.runs // 4, 10), work)
                rows[precision] = {**single, "throughput": args.batch / batch["medianMs"] * 1e3,
                                   "batchCpuNodes": batch["cpuNodes"]}  # fmt: skip
                r, base = rows[precision], rows["fp32"]
                print(f"{name:<12}{precision:<10}{r['medianMs']:>11.3f}"
                      f"{r['medianMs'] / base['medianMs']:>7.2f}x{r['throughput']:>10.0f}"
                      f"{r['throughput'] / base['throughput']:>7.2f}x  "
                      f"{len(r['cpuNodes'])}")  # fmt: skip
                for node in r["cpuNodes"][:20]:
                    print(f"{'':<22}on CPU: {node}")
            report["models"][name] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
