"""The source budget: what a job may fetch, from its work volume and free space."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kquant_job.budget import WORK_FACTOR, source_budget
from kquant_job.errors import InvalidSpec
from kquant_job.validate import inputs


def test_budget_is_the_smaller_room_over_the_work_factor(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    assert source_budget(tmp_path, {}) == pytest.approx(free / WORK_FACTOR, rel=1e-3)
    assert source_budget(tmp_path, {"KQUANT_WORK_BYTES": "1000"}) == 400
    huge = str(free * 10)  # a sizeLimit beyond the disk: the disk is the bound
    assert source_budget(tmp_path, {"KQUANT_WORK_BYTES": huge}) == pytest.approx(
        free / WORK_FACTOR, rel=1e-3
    )
    for bad in ("50Gi", "0", "-5"):
        with pytest.raises(InvalidSpec, match="KQUANT_WORK_BYTES"):
            source_budget(tmp_path, {"KQUANT_WORK_BYTES": bad})


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
