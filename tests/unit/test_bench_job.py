"""The whole-job benchmark runs end to end on a small BERT: the worker and onnxruntime's own
converter on the same model, embedded and external weights, and prints ratios."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "bench" / "bench_job.py"


def test_the_job_benchmark_prints_ratios_for_both_layouts(capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("bench_job", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--layers", "1", "--hidden", "64", "--methods", "fp16"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^fp16\s+(embedded|external)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x", out, re.M)
    assert [r[0] for r in rows] == ["embedded", "external"], out
    for _, job, floor, ratio in rows:
        # the worker does the converter's work and more (validation, publishing)
        assert float(job) > 0 and float(floor) > 0
        assert float(ratio) == pytest.approx(
            float(job) / float(floor), rel=0.05
        )  # times printed to 10 ms
    assert "convert" in out and "validate" in out
