"""Honest results: a fallback or repair is said in the result (and so the status), the log and
the table; strict: true publishes the requested configuration or fails; the table names the
worst output, one row per output and per model, the tolerance applied, and the ratios."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import silero_dir
from worker_helpers import manifest, run_worker


def silero(tmp_path: Path) -> Path:
    model = tmp_path / "m" / "silero_vad.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes((silero_dir() / "silero_vad.onnx").read_bytes())
    return model


def assert_worst_first(table: str) -> None:
    """The output rows begin with the one the "worst output" row names (new-user trial: the
    rows were in max abs error, and FP16 Silero's worst output came second)."""
    rows = [line.split()[1] for line in table.splitlines() if line.strip().startswith("output ")]
    worst = next(line for line in table.splitlines() if "worst output" in line).split()[2]
    assert rows[0] == worst, table


def test_an_int8_fallback_shows_in_the_result_the_log_and_the_table(tmp_path):
    # requireGain off: the fallback's latency (1.2-1.7x FP32, by CPU) decides NoGain by machine
    job = manifest(f"file://{silero(tmp_path)}", f"file://{tmp_path}/out/",
                   {"precision": "int8", "requireGain": False}, endpoint=None)  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert run.code == 0, run.log
    [note] = [n for n in run.result["notes"] if "fell back" in n]
    assert "INT8 fell back to denseOpsOnly" in note and "strict: true" in note
    assert "WARNING" in run.log and "INT8 fell back to denseOpsOnly" in run.log
    table = run.log.split("  job ", 1)[1]
    assert "NOTE" in table and "fell back to denseOpsOnly" in table
    for row in ("output output", "output stateN", "worst output", "tolerance"):
        assert row in table, row
    assert_worst_first(table)
    assert "maxMeanAbsError <= 0.05, minCosineSimilarity >= 0.98 (default)" in table
    assert "x the original" in table  # size as a ratio


def test_strict_publishes_the_requested_configuration_or_nothing(tmp_path):
    job = manifest(f"file://{silero(tmp_path)}", f"file://{tmp_path}/out/",
                   {"precision": "int8", "strict": True}, endpoint=None)  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert (run.code, run.result["reason"]) == (40, "ValidationFailed"), run.log
    report = json.loads(Path(run.result["reportUri"].removeprefix("file://")).read_text())
    attempts = report["models"][0]["details"]["attempts"]
    assert [a["attempt"] for a in attempts] == ["requested"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_fp16_on_cpu_says_it_is_slower(tmp_path):
    job = manifest(f"file://{silero(tmp_path)}", f"file://{tmp_path}/out/",
                   {"precision": "fp16"}, endpoint=None,
                   validation={"latencyRuns": 30, "warmupRuns": 5})  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert run.code == 0, run.log
    assert_worst_first(run.log.split("  job ", 1)[1])
    latency = run.result["validation"]["latencyMs"]
    slower = latency["quantized"] > 1.05 * latency["original"]
    said = [
        n for n in run.result.get("notes", []) if n.startswith("slower than the original on cpu")
    ]
    assert bool(said) == slower, (latency, run.result.get("notes"))
