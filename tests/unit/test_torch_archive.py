"""The archive check before torch loads a zip (passes/torch_common.check_archive): a bomb
split over records, and a zip whose directory torch would read elsewhere than Python's
zipfile, are refused before anything inflates."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest

from kquant_job.errors import PassError
from kquant_job.passes.torch_common import check_archive


def _zip(path: Path, records: dict[str, bytes], method: int) -> Path:
    with zipfile.ZipFile(path, "w", compression=method, compresslevel=1) as archive:
        for name, data in records.items():
            archive.writestr(f"m/{name}", data)
    return path


def test_a_bomb_split_over_records_is_refused(tmp_path: Path) -> None:
    """Eight records of 10 MiB of zeros: each under the 64 MiB floor, 80 MiB together at
    about 1000x."""
    records = {f"data/{i}": bytes(10 * 2**20) for i in range(8)}
    path = _zip(tmp_path / "split.pt", records, zipfile.ZIP_DEFLATED)
    with pytest.raises(PassError) as info:
        check_archive(path, "split.pt")
    assert info.value.reason.value == "UnsafeModel"
    assert "its 8 compressed records declare 83886080 bytes" in str(info.value)


def test_records_stored_as_torch_writes_them_pass(tmp_path: Path) -> None:
    records = {f"data/{i}": bytes(10 * 2**20) for i in range(8)}
    check_archive(_zip(tmp_path / "plain.pt", records, zipfile.ZIP_STORED), "plain.pt")
    small = {"data.pkl": bytes(2**20)}  # compressed, but far under the floor
    check_archive(_zip(tmp_path / "small.pt", small, zipfile.ZIP_DEFLATED), "small.pt")


def test_a_directory_torch_would_read_elsewhere_is_refused(tmp_path: Path) -> None:
    """A decoy directory of the same length just before the end record (what Python's
    zipfile reads) and the end record naming the first one (what torch's miniz reads)."""
    path = _zip(tmp_path / "m.pt", {"data.pkl": b"x" * 100}, zipfile.ZIP_STORED)
    raw = path.read_bytes()
    end = struct.Struct("<IHHHHIIH")
    sig, d0, d1, n0, n, size, offset, _ = end.unpack(raw[-22:])
    directory = raw[offset : offset + size]
    decoy = raw[: offset + size] + directory + end.pack(sig, d0, d1, n0, n, size, offset, 0)
    path.write_bytes(decoy)
    with zipfile.ZipFile(path) as archive:  # Python's reader takes the decoy, silently
        assert archive.start_dir == offset + size
    with pytest.raises(PassError) as info:
        check_archive(path, "m.pt")
    assert info.value.reason.value == "UnsafeModel"
    assert f"lies at byte {offset + size}, its end records name {offset}" in str(info.value)


def test_a_zip64_end_record_torch_would_read_elsewhere_is_refused(tmp_path: Path) -> None:
    """A decoy directory and zip64 end record just before the locator (what Python's zipfile
    reads) while the locator names the first record (what torch's miniz reads): refused."""
    import torch

    path = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(4)}, path)  # torch writes zip64 end records
    check_archive(path, "m.pt")  # as torch wrote it
    raw = path.read_bytes()
    locator, record = struct.Struct("<IIQI"), struct.Struct("<IQHHIIQQQQ")
    at = len(raw) - 22 - locator.size
    sig, disk, record_at, disks = locator.unpack(raw[at : at + locator.size])
    fields = list(record.unpack(raw[record_at : record_at + record.size]))
    size, offset = fields[8], fields[9]
    directory = raw[offset : offset + size]
    fields[9] = record_at + record.size  # the decoy directory follows the first record
    decoy = (
        raw[:at]  # records, directory A, record A
        + directory
        + record.pack(*fields)
        + locator.pack(sig, disk, record_at, disks)  # still naming record A
        + raw[-22:]
    )
    path.write_bytes(decoy)
    with zipfile.ZipFile(path) as archive:  # Python's reader takes the decoy, silently
        assert archive.start_dir == record_at + record.size
    with pytest.raises(PassError, match="its zip64 locator names byte") as info:
        check_archive(path, "m.pt")
    assert info.value.reason.value == "UnsafeModel"


def test_a_local_header_that_disagrees_with_the_directory_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "m.pt", {"data.pkl": b"x" * 100}, zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    raw[8:10] = struct.pack("<H", zipfile.ZIP_DEFLATED)  # the first local header's method
    path.write_bytes(bytes(raw))
    with pytest.raises(PassError, match="local header disagrees"):
        check_archive(path, "m.pt")
