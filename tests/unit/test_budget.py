"""The work budget: the room a job has, the factor of each conversion, and the check that
refuses a job before any transfer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kquant_api import ModelFormat, QuantizationConfig, Reason
from kquant_job.budget import check_budget, room, work_factor
from kquant_job.errors import InvalidSpec, StorageError
from kquant_job.validate import inputs


def test_room_is_the_smaller_of_the_volume_limit_and_the_free_space(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    assert room(tmp_path, {}) == pytest.approx(free, rel=1e-3)
    assert room(tmp_path, {"KQUANT_WORK_BYTES": "1000"}) == 1000
    huge = str(free * 10)  # a sizeLimit beyond the disk: the disk is the bound
    assert room(tmp_path, {"KQUANT_WORK_BYTES": huge}) == pytest.approx(free, rel=1e-3)
    for bad in ("50Gi", "0", "-5"):
        with pytest.raises(InvalidSpec, match="KQUANT_WORK_BYTES"):
            room(tmp_path, {"KQUANT_WORK_BYTES": bad})


def test_factors_follow_the_measured_peaks_per_method() -> None:
    def factor(precision: str, fmt: ModelFormat = ModelFormat.auto) -> float:
        return work_factor(QuantizationConfig(precision=precision), fmt)

    # bench/bench_workdir.py: ONNX INT8 4.0x, ONNX FP16 up to 2.5x, PyTorch 1.25x-1.5x
    assert factor("int8") >= 4.0 and factor("int8", ModelFormat.onnx) >= 4.0
    assert factor("fp16") >= 2.5
    assert factor("fp16", ModelFormat.torchscript) >= 1.5
    assert factor("bf16") >= 1.5 and factor("bf16") < factor("fp16")


def test_the_whole_job_counts_source_times_factor_plus_every_sample_set() -> None:
    check_budget(1000, 4.0, ("s3://b/m.onnx", 200), {"s3://b/eval/": 100, "s3://b/cal/": 100})
    with pytest.raises(StorageError) as info:
        check_budget(1000, 4.0, ("s3://b/m.onnx", 200), {"s3://b/eval/": 101, "s3://b/c/": 100})
    assert info.value.reason is Reason.SourceTooLarge
    message = str(info.value)
    assert "1001 bytes" in message and "s3://b/m.onnx: 200 bytes x 4" in message
    assert "s3://b/eval/: 101 bytes" in message and "1000 bytes" in message


def test_npz_inflating_beyond_the_sample_bound_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few KiB of zeros that inflate to 4 MiB, against a bound lowered to 1 MiB (the real
    one, 1 GiB, would take a 1 GiB array to test)."""
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, x=np.zeros(2**20, np.float32))
    assert bomb.stat().st_size < 64 * 1024
    monkeypatch.setattr(inputs, "MAX_SAMPLE_BYTES", 2**20)
    with pytest.raises(InvalidSpec, match=r"bomb.npz: \d+ bytes of arrays once inflated"):
        inputs.read_npz(bomb)
    small = tmp_path / "small.npz"
    np.savez_compressed(small, x=np.ones(16, np.float32))
    assert inputs.read_npz(small)["x"].tolist() == [1.0] * 16
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidSpec, match=r"not a readable \.npz"):
        inputs.read_npz(tmp_path / "junk.npz")


def test_each_object_counts_the_blocks_it_will_take():
    from kquant_job.pipeline import on_disk

    assert [on_disk(n) for n in (0, 1, 4096, 4097)] == [4096, 4096, 4096, 8192]


def test_many_tiny_source_files_are_refused_before_any_fetch(tmp_path):
    """300 one-byte files and a 1 MiB work volume: 300 bytes by size, 1.2 MB on disk (INT8
    counts the source 4x more): SourceTooLarge before anything is copied."""
    import json
    import os
    import subprocess
    import sys

    src = tmp_path / "many"
    src.mkdir()
    for i in range(300):
        (src / f"{i:03d}.txt").write_bytes(b"x")
    spec = {"apiVersion": "kquant.io/v1alpha1", "kind": "QuantizationJob",
            "metadata": {"name": "tiny"},
            "spec": {"model": {"uri": f"file://{src}/"}, "output": {"uri": f"file://{tmp_path}/o/"},
                     "quantization": {"precision": "int8"}}}  # fmt: skip
    (tmp_path / "job.json").write_text(json.dumps(spec))
    env = {**os.environ, "KQUANT_WORK_BYTES": str(2**20)}
    cmd = [sys.executable, "-m", "kquant_job.cli", "run", str(tmp_path / "job.json"),
           "--result-file", str(tmp_path / "r.json"),
           "--work-dir", str(tmp_path / "w")]  # fmt: skip
    subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["reason"] == "SourceTooLarge", result
