"""The GPU benchmark: without a GPU it says why and exits 0; its measuring path (kquant's
FP16 and INT8 passes, latency and throughput, the nodes the CPU provider ran, read from
onnxruntime's profiler) runs on this CPU-only onnxruntime too, where every node is listed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "bench" / "bench_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_why_and_exits_0() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine's onnxruntime has CUDA")
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("no GPU: onnxruntime")
    assert "nothing measured" in run.stdout


def test_the_measuring_path_lists_nodes_placed_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    bench = _bench()
    monkeypatch.setattr(bench, "cuda_unavailable", lambda: None)  # CPU stands in for CUDA
    out = tmp_path / "gpu.json"
    args = ["--models", "silero_vad", "--runs", "3", "--batch", "2", "--json", str(out)]
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    rows = report["models"]["silero_vad"]
    assert set(rows) == {"fp32", "fp16", "int8"}
    for row in rows.values():
        assert row["medianMs"] > 0 and row["throughput"] > 0
        # on the CPU-only build every node ran on the CPU provider: all are listed
        assert row["cpuNodes"] and not any("Memcpy" in n for n in row["cpuNodes"])
    assert any("(Cast)" in n for n in rows["fp16"]["cpuNodes"])  # keep_io_types' casts
    printed = capsys.readouterr().out
    assert "silero_vad  fp16" in printed and "on CPU: " in printed
