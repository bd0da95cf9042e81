"""The worker's acceptance of a sandboxed stage's folder (sandbox/accept.py): copies made
from the source by the worker, exactly the declared files, pinned digests checked."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from kquant_job.errors import KquantError, PassError, StorageError
from kquant_job.sandbox.accept import accept_staged
from kquant_job.stage import ModelOutcome, StageInput, StageOutcome


def _setup(tmp_path: Path) -> tuple[StageInput, StageOutcome]:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.pt").write_bytes(b"original")
    (src / "sub" / "config.json").write_text('{"a": 1}')
    staged = tmp_path / "box" / "staged"
    staged.mkdir(parents=True)
    (staged / "model.pt").write_bytes(b"converted")
    io = StageInput(source=src, data=[], data_dir=tmp_path, calib=[], calib_dir=tmp_path,
                    staged=staged, scratch=tmp_path / "box" / "scratch")  # fmt: skip
    model = ModelOutcome(
        source="model.pt", format="torchscript", external=[], out_rel="model.pt",
        out_files=["model.pt"], original_bytes=8, quantized_bytes=9, pass_name="p",
        details={}, sha256={"model.pt": hashlib.sha256(b"converted").hexdigest()},
    )  # fmt: skip
    stage = StageOutcome(models=[model], copies=["sub/config.json"], kept={}, timings={},
                         copied_from={"sub/config.json": "sub/config.json"})  # fmt: skip
    return io, stage


def test_the_worker_makes_the_copies_and_takes_the_declared_files(tmp_path: Path) -> None:
    io, stage = _setup(tmp_path)
    assert accept_staged(stage, io) == ["model.pt", "sub/config.json"]
    assert (io.staged / "sub" / "config.json").read_text() == '{"a": 1}'


def test_a_changed_converted_file_or_a_stray_file_is_refused(tmp_path: Path) -> None:
    io, stage = _setup(tmp_path)
    (io.staged / "model.pt").write_bytes(b"tampered!")
    with pytest.raises(PassError, match=r"model\.pt changed after the conversion") as info:
        accept_staged(stage, io)
    assert info.value.reason.value == "UnsafeModel"
    (io.staged / "model.pt").write_bytes(b"converted")
    (io.staged / "sub" / "config.json").unlink()  # the copy the first call made
    (io.staged / "extra.bin").write_bytes(b"x")
    with pytest.raises(PassError, match=r"extra\.bin, which no conversion wrote"):
        accept_staged(stage, io)


def test_a_file_at_a_copy_s_name_before_the_copy_is_a_stray(tmp_path: Path) -> None:
    io, stage = _setup(tmp_path)
    (io.staged / "sub").mkdir()
    (io.staged / "sub" / "config.json").write_text("written by model code")
    with pytest.raises(PassError, match=r"sub/config\.json, which no conversion wrote"):
        accept_staged(stage, io)


def test_a_copy_outside_the_source_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    io, stage = _setup(tmp_path)
    (tmp_path / "secret").write_text("s")
    stage.copied_from = {"sub/config.json": "../secret"}
    with pytest.raises(StorageError) as info:
        accept_staged(stage, io)
    assert info.value.reason.value == "UnsafePath"
    assert not (io.staged / "sub" / "config.json").exists()
    (tmp_path / "src" / "link.json").symlink_to(tmp_path / "secret")
    stage.copied_from = {"sub/config.json": "link.json"}  # a link leading out of the folder
    with pytest.raises(StorageError):
        accept_staged(stage, io)
    io2, stage2 = _setup(tmp_path / "again")
    (io2.staged / "model.pt").unlink()
    with pytest.raises(KquantError, match="did not write it") as missing:
        accept_staged(stage2, io2)
    assert missing.value.reason.value == "InternalError"


def test_a_file_where_a_copy_needs_a_folder_is_a_stray(tmp_path: Path) -> None:
    io, stage = _setup(tmp_path)
    (io.staged / "sub").write_text("a file where the copies' folder goes")
    with pytest.raises(PassError, match=r"sub, which no conversion wrote") as info:
        accept_staged(stage, io)
    assert info.value.reason.value == "UnsafeModel"


def test_a_copy_that_grew_since_the_plan_is_refused(tmp_path: Path) -> None:
    io, stage = _setup(tmp_path)
    stage.copy_bytes = {"sub/config.json": 3}  # its size when the stage planned it
    with pytest.raises(StorageError) as info:
        accept_staged(stage, io)
    assert info.value.reason.value == "ConcurrentWrite" and "grew past the 3 bytes" in str(
        info.value
    )


def test_copies_past_what_the_work_volume_has_left_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source read in place grown (sparse, costing its owner nothing) before the stage
    planned it: its copy would be dense in the work volume."""
    io, stage = _setup(tmp_path)
    (tmp_path / "src" / "sub" / "config.json").write_bytes(os.urandom(3 * 2**20))
    monkeypatch.setenv("KQUANT_WORK_BYTES", str(2**20))
    with pytest.raises(StorageError) as info:
        accept_staged(stage, io)
    assert info.value.reason.value == "SourceTooLarge"
