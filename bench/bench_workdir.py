"""Peak disk usage of the worker's work directory, per method, over the source model's size.

Builds three FP32 source models of about ``--mb`` MiB each in a temporary folder:

- ``model.onnx``: a transformer-like ONNX graph with embedded weights (pre-LayerNorm blocks:
  Q/K/V/output MatMuls, Softmax attention, a two-MatMul feed-forward with bias Add and Relu,
  residual Adds; a ReduceMean + Gemm head), opset 17, random weights;
- ``model.pt``: the same weights as a PyTorch state dict (``torch.save`` of a dict of FP32
  tensors);
- ``model.jit``: a TorchScript archive (``torch.jit.script``) of a LayerNorm followed by
  Linear + ReLU layers.

Then runs one ``kquant-job run job.yaml --work-dir WORK --result-file RESULT`` per method in
a subprocess (the worker is a black box here: only its command line and result file are
used), with ``file://`` URIs for the model, a fresh output folder and, for int8 static, a
folder of ``.npz`` calibration feeds (one feed per file, arrays named after the inputs).
Validation uses generated inputs (2 samples, 1 latency run; ``--validation-data`` writes them
as ``.npz`` files and sets ``dataUri`` instead) and the precision's default tolerance
(``--loose``: one that every job passes). ``TMPDIR`` of the job points to a folder of
its own, polled too: libraries (onnxruntime's quantization pre-processing) write temporary
models there, outside WORK, unless the worker points them into WORK itself.

While a job runs, a thread walks WORK and TMPDIR every ``--interval-ms`` (20 ms) and keeps
the maximum of the total allocated size (``st_blocks * 512`` of every regular file, hard links
counted once, files that vanish mid-walk skipped); the apparent size (``st_size``) is tracked
too. A write-and-delete shorter than the interval can be missed: the figures are lower bounds.
Columns:

- ``work/src``: peak of WORK over the source's size (what the worker's disk budget,
  ``kquant_job.budget.WORK_FACTORS``, bounds); ``-data``: the same without the job's
  validation/calibration files (``data B``, fetched into WORK like the model);
- ``tmp B``: peak of the job's TMPDIR; ``all/src``: peak of WORK + TMPDIR sampled together;
- ``out B``: what the output folder holds at the end (in a cluster it goes to S3);
- ``rc`` and ``reason``: the exit code and the result file's reason (a failed job is listed,
  not fatal; its message is printed below the table).

Prints figures only; nothing passes or fails.

    .venv/bin/python bench/bench_workdir.py --mb 100
    .venv/bin/python bench/bench_workdir.py --mb 40 --methods onnx-fp16,jit-int8-dynamic
    .venv/bin/python bench/bench_workdir.py --mb 40 --show-peak   # the files at each peak
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ONNX_HIDDEN = 384  # one block: 12 x 384 x 384 FP32 weights = 6.75 MiB
ONNX_SEQ = 16  # validation/calibration sequence length
JIT_HIDDEN = 1024  # one Linear: 1024 x 1024 FP32 = 4 MiB
JIT_BATCH = 4
KQUANT_JOB = Path(sys.executable).with_name("kquant-job")
# --loose: a tolerance that random-weight models pass whatever their depth, so that every job
# reaches publishing (with the defaults, deep INT8 models may end in ValidationFailed).
LOOSE = {"maxMeanAbsError": 1.0, "minCosineSimilarity": 0.5}

# method -> (source kind, spec.quantization)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "onnx-fp16": ("onnx", {"precision": "fp16"}),
    "onnx-int8-dynamic": ("onnx", {"precision": "int8", "mode": "dynamic"}),
    "onnx-int8-static": ("onnx", {"precision": "int8", "mode": "static", "quantFormat": "QDQ"}),
    "pt-fp16": ("state_dict", {"precision": "fp16"}),
    "jit-fp16": ("torchscript", {"precision": "fp16"}),
    "jit-int8-dynamic": ("torchscript", {"precision": "int8", "mode": "dynamic"}),
}


@dataclass
class Source:
    """A source model and how to feed it: input name -> shape (empty: nothing runs)."""

    path: Path
    inputs: dict[str, list[int]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.path.stat().st_size


# ---------------------------------------------------------------------------- source models


def _onnx_weights(mb: float, seed: int = 0) -> dict[str, np.ndarray]:
    """FP32 weights of the ONNX model, by initializer name (shared with the state dict)."""
    d = ONNX_HIDDEN
    rng = np.random.default_rng(seed)
    per_block = 12 * d * d * 4
    blocks = max(1, round((mb * 2**20 - d * d * 4) / per_block))

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(rows**0.5)

    def vec(n: int, scale: float = 0.02, base: float = 0.0) -> np.ndarray:
        return (base + scale * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    for i in range(blocks):
        p = f"blocks.{i}."
        w[p + "ln1.weight"], w[p + "ln1.bias"] = vec(d, 0.02, 1.0), vec(d)
        for name in ("q", "k", "v", "o"):
            w[p + f"attn.{name}.weight"], w[p + f"attn.{name}.bias"] = mat(d, d), vec(d)
        w[p + "ln2.weight"], w[p + "ln2.bias"] = vec(d, 0.02, 1.0), vec(d)
        w[p + "ffn.up.weight"], w[p + "ffn.up.bias"] = mat(d, 4 * d), vec(4 * d)
        w[p + "ffn.down.weight"], w[p + "ffn.down.bias"] = mat(4 * d, d), vec(d)
    w["ln_f.weight"], w["ln_f.bias"] = vec(d, 0.02, 1.0), vec(d)
    w["head.weight"], w["head.bias"] = mat(d, d), vec(d)
    return w


def build_onnx(path: Path, weights: dict[str, np.ndarray]) -> Source:
    """A pre-LN transformer encoder over ``x`` [batch, seq, hidden]; outputs the hidden
    states ``y`` and a pooled ``logits`` [batch, hidden] (ReduceMean + Gemm)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = ONNX_HIDDEN
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(a, name) for name, a in weights.items()]
    inits.append(numpy_helper.from_array(np.array(1 / math.sqrt(d), np.float32), "attn_scale"))

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def norm(x: str, p: str) -> str:
        return node("LayerNormalization", [x, p + ".weight", p + ".bias"], p, axis=-1)

    def linear(x: str, p: str) -> str:
        m = node("MatMul", [x, p + ".weight"], p + ".matmul")
        return node("Add", [m, p + ".bias"], p + ".add")

    x = "x"
    blocks = sum(1 for name in weights if name.endswith(".ln1.weight"))
    for i in range(blocks):
        p = f"blocks.{i}"
        h = norm(x, p + ".ln1")
        q, k, v = (linear(h, f"{p}.attn.{n}") for n in ("q", "k", "v"))
        kt = node("Transpose", [k], p + ".attn.kt", perm=[0, 2, 1])
        s = node("MatMul", [q, kt], p + ".attn.scores")
        s = node("Mul", [s, "attn_scale"], p + ".attn.scaled")
        a = node("Softmax", [s], p + ".attn.probs", axis=-1)
        c = node("MatMul", [a, v], p + ".attn.context")
        x = node("Add", [x, linear(c, p + ".attn.o")], p + ".residual1")
        h = norm(x, p + ".ln2")
        h = node("Relu", [linear(h, p + ".ffn.up")], p + ".ffn.relu")
        x = node("Add", [x, linear(h, p + ".ffn.down")], p + ".residual2")
    y = norm(x, "ln_f")
    nodes.append(helper.make_node("Identity", [y], ["y"], name="y"))
    pooled = node("ReduceMean", [y], "pool", axes=[1], keepdims=0)
    nodes.append(
        helper.make_node("Gemm", [pooled, "head.weight", "head.bias"], ["logits"], name="head")
    )
    graph = helper.make_graph(
        nodes,
        "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", d]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return Source(path, {"x": [1, ONNX_SEQ, d]})


def build_state_dict(path: Path, weights: dict[str, np.ndarray]) -> Source:
    import torch

    torch.save({name: torch.from_numpy(a.copy()) for name, a in weights.items()}, path)
    return Source(path)


def build_torchscript(path: Path, mb: float) -> Source:
    import torch
    from torch import nn

    layers = max(1, round(mb * 2**20 / (JIT_HIDDEN * JIT_HIDDEN * 4)))

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(JIT_HIDDEN)
            self.layers = nn.ModuleList(nn.Linear(JIT_HIDDEN, JIT_HIDDEN) for _ in range(layers))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.norm(x)
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x

    torch.manual_seed(0)
    with torch.no_grad():
        torch.jit.save(torch.jit.script(Stack().eval()), str(path))
    return Source(path, {"x": [JIT_BATCH, JIT_HIDDEN]})


def write_feeds(folder: Path, inputs: dict[str, list[int]], count: int, seed: int) -> int:
    """``count`` .npz feeds (one per file, arrays named after the inputs); returns bytes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        feed = {n: rng.standard_normal(s, dtype=np.float32) for n, s in inputs.items()}
        np.savez(folder / f"feed_{i:04d}.npz", **feed)
    return sum(f.stat().st_size for f in folder.iterdir())


# ----------------------------------------------------------------------------- disk polling


def tree_bytes(root: Path, files: dict[str, int] | None = None) -> tuple[int, int]:
    """(allocated, apparent) bytes of the regular files under ``root``, recursively; hard
    links counted once; whatever vanishes during the walk is skipped. ``files``, when given,
    receives each file's allocated bytes by path."""
    allocated = apparent = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            if (st.st_dev, st.st_ino) not in seen:
                                seen.add((st.st_dev, st.st_ino))
                                allocated += st.st_blocks * 512
                                apparent += st.st_size
                                if files is not None:
                                    files[entry.path] = st.st_blocks * 512
                    except OSError:  # gone, or replaced by something else, mid-walk
                        continue
        except OSError:
            continue
    return allocated, apparent


class Poller(threading.Thread):
    """Samples ``roots`` every ``interval`` s until stopped; keeps each root's peak
    (allocated and apparent), the peak of their allocated total and, with ``listing``, the
    files present at each of these peaks (``peak_files``, keyed by root name and "all")."""

    def __init__(self, roots: dict[str, Path], interval: float, listing: bool = False) -> None:
        super().__init__(daemon=True)
        self.roots, self.interval, self.listing = roots, interval, listing
        self.peak_files: dict[str, dict[str, int]] = {}
        self.peak = {name: 0 for name in roots}
        self.peak_apparent = {name: 0 for name in roots}
        self.peak_total = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        total = 0
        everything: dict[str, int] = {}
        for name, root in self.roots.items():
            files: dict[str, int] | None = {} if self.listing else None
            allocated, apparent = tree_bytes(root, files)
            if allocated > self.peak[name]:
                self.peak[name] = allocated
                self.peak_files[name] = files or {}
            self.peak_apparent[name] = max(self.peak_apparent[name], apparent)
            everything.update(files or {})
            total += allocated
        if total > self.peak_total:
            self.peak_total = total
            self.peak_files["all"] = everything
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


# --------------------------------------------------------------------------------- one job


def run_job(method: str, source: Source, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    kind, quantization = METHODS[method]
    base = root / "runs" / method
    work, tmp = base / "work", base / "tmp"
    work.mkdir(parents=True)
    tmp.mkdir()
    out = base / "out"
    data_bytes = 0
    quantization = dict(quantization)
    validation: dict[str, Any] = {"samples": args.samples, "latencyRuns": 1, "warmupRuns": 0}
    if args.loose:
        validation["tolerance"] = dict(LOOSE)
    if source.inputs:
        if args.validation_data:
            data_bytes += write_feeds(base / "validation", source.inputs, args.samples, 1)
            validation["dataUri"] = (base / "validation").as_uri() + "/"
        else:
            validation["inputs"] = {n: {"shape": s} for n, s in source.inputs.items()}
    if quantization.get("mode") == "static":
        calib = base / "calib"
        data_bytes += write_feeds(calib, source.inputs, args.calib_samples, 2)
        quantization["calibration"] = {"uri": calib.as_uri() + "/", "samples": args.calib_samples}
    job = {
        "apiVersion": "kquant.io/v1alpha1",
        "kind": "QuantizationJob",
        "metadata": {"name": f"bench-{method}"},
        "spec": {
            "model": {"uri": source.path.as_uri()},
            "output": {"uri": out.as_uri() + "/"},
            "quantization": quantization,
            "validation": validation,
        },
    }
    manifest = base / "job.yaml"
    manifest.write_text(yaml.safe_dump(job, sort_keys=False))
    result_file, log = base / "result.json", base / "job.log"
    command = [
        str(KQUANT_JOB), "run", str(manifest),
        "--work-dir", str(work), "--result-file", str(result_file),
    ]  # fmt: skip
    poller = Poller({"work": work, "tmp": tmp}, args.interval_ms / 1000, args.show_peak)
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("KQUANT_WORK_DIR", None)
    started = time.perf_counter()
    poller.start()
    with log.open("wb") as sink:
        rc = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - started
    poller.stop()
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        result = {}
    reason = result.get("reason") or "?"
    message = result.get("message") or ""
    if rc and not message:
        message = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    return {
        "method": method,
        "kind": kind,
        "source": source.size,
        "work": poller.peak["work"],
        "work_apparent": poller.peak_apparent["work"],
        "tmp": poller.peak["tmp"],
        "total": poller.peak_total,
        "data": data_bytes,
        "out": tree_bytes(out)[1] if out.exists() else 0,
        "left": tree_bytes(work)[0],
        "samples": poller.samples,
        "wall": wall,
        "rc": rc,
        "reason": reason,
        "message": message,
        "peak_files": {
            key: {str(Path(p).relative_to(base)): b for p, b in files.items() if b}
            for key, files in poller.peak_files.items()
        },
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'method':<19}{'source B':>12}{'peak work B':>13}{'work/src':>9}{'-data':>7}"
          f"{'tmp B':>11}{'all/src':>8}{'data B':>10}{'out B':>12}{'wall s':>8}{'rc':>4}"
          f"  reason")  # fmt: skip
    for r in rows:
        src = r["source"]
        print(f"{r['method']:<19}{src:>12}{r['work']:>13}{r['work'] / src:>8.2f}x"
              f"{(r['work'] - r['data']) / src:>6.2f}x{r['tmp']:>11}{r['total'] / src:>7.2f}x"
              f"{r['data']:>10}{r['out']:>12}{r['wall']:>8.1f}{r['rc']:>4}"
              f"  {r['reason']}")  # fmt: skip
    for r in rows:
        if r["rc"] or r["left"]:
            notes = [r["message"][:400]] if r["rc"] else []
            if r["left"]:
                notes.append(f"{r['left']} B left in the work directory after exit")
            print(f"{r['method']}: {'; '.join(notes)}")
    apparent = max((r["work_apparent"] / r["source"] for r in rows), default=0)
    print(f"apparent sizes (st_size): peak work/src up to {apparent:.2f}x; "
          f"polls per job: {min(r['samples'] for r in rows)}-"
          f"{max(r['samples'] for r in rows)}")  # fmt: skip
    from kquant_job.budget import TORCH_FACTOR, WORK_FACTORS

    factors = ", ".join(f"{p} {f:g}x" for p, f in WORK_FACTORS.items())
    print(f"the worker's budget factors (kquant_job.budget): {factors}; a declared PyTorch "
          f"format {TORCH_FACTOR:g}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=100, help="MiB of FP32 weights per model (100)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of %(default)s"
    )
    parser.add_argument("--dir", type=Path, help="parent of the temporary folder")
    parser.add_argument("--interval-ms", type=float, default=20, help="poll interval (20)")
    parser.add_argument("--samples", type=int, default=2, help="validation samples (2)")
    parser.add_argument("--calib-samples", type=int, default=4, help="int8 static feeds (4)")
    parser.add_argument(
        "--validation-data",
        action="store_true",
        help="write the validation feeds as .npz files (dataUri) instead of generating them",
    )
    parser.add_argument(
        "--show-peak",
        action="store_true",
        help="list the files in WORK and TMPDIR at each job's peak (relative to its folder)",
    )
    parser.add_argument(
        "--loose",
        action="store_true",
        help=f"validation tolerance {LOOSE} instead of the precision's default (the INT8 "
        "retries that a missed tolerance triggers are then not exercised)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")

    root = Path(tempfile.mkdtemp(prefix="bench-workdir-", dir=args.dir))
    try:
        kinds = {METHODS[m][0] for m in methods}
        (root / "src").mkdir()
        started = time.perf_counter()
        sources: dict[str, Source] = {}
        weights = _onnx_weights(args.mb) if kinds & {"onnx", "state_dict"} else {}
        if "onnx" in kinds:
            sources["onnx"] = build_onnx(root / "src" / "model.onnx", weights)
        if "state_dict" in kinds:
            sources["state_dict"] = build_state_dict(root / "src" / "model.pt", weights)
        if "torchscript" in kinds:
            sources["torchscript"] = build_torchscript(root / "src" / "model.jit", args.mb)
        del weights
        took = time.perf_counter() - started
        sizes = ", ".join(f"{s.path.name} {s.size / 2**20:.1f} MiB" for s in sources.values())
        print(f"sources ({took:.1f} s): {sizes}")
        rows = []
        for method in methods:
            row = run_job(method, sources[METHODS[method][0]], root, args)
            print(f"  {method}: {row['wall']:.1f} s, rc {row['rc']} {row['reason']}", flush=True)
            rows.append(row)
        print_table(rows)
        for row in rows if args.show_peak else []:
            for key, what in (("work", "WORK"), ("all", "WORK + TMPDIR")):
                listing = row["peak_files"].get(key, {})
                print(f"{row['method']} at its {what} peak ({sum(listing.values())} B):")
                for path, size in sorted(listing.items(), key=lambda item: -item[1]):
                    print(f"  {size:>12}  {path}")
        if args.keep:
            print(f"kept {root}")
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
