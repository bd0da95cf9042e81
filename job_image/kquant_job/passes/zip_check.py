"""The check of a zip archive (``torch.save`` checkpoint, TorchScript file) before torch opens
it: no archive bomb, and no record the check would not see.

Sizes come from the central directory, which Python's ``zipfile`` reads; torch reads the
archive with miniz. The two find the directory differently (``zipfile``: the end records
just before the end; miniz: the offsets those records name), so an archive built to show
each a different directory passed an earlier check (a decoy directory before the end
record; then a decoy zip64 end record before the zip64 locator, the locator naming the real
one). torch writes one layout only, and anything else is refused (:func:`check_archive`):

    [local header, data, data descriptor]... central directory, zip64 end record,
    zip64 locator, end record (no comment)

(APPNOTE.TXT 6.3: 4.3.6 overall layout, 4.3.14-4.3.16 end records). The zip64 records may be
absent (other writers); where present they must sit where the locator says, and the
directory must end where they begin.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from kquant_api import Reason
from kquant_job.errors import PassError

__all__ = ["INFLATION_FLOOR", "MAX_INFLATION", "check_archive"]

# torch.save and torch.jit.save store their records uncompressed. A compressed record that
# inflates far beyond its stored bytes is how a 2 MB file becomes gigabytes in memory: torch's
# reader inflates a pickle record whole before unpickling it.
MAX_INFLATION = 100  # declared size / compressed size
INFLATION_FLOOR = 64 * 1024 * 1024  # bytes: smaller records are harmless at any ratio

_END = struct.Struct("<IHHHHIIH")  # end of central directory record, 22 bytes
_LOCATOR = struct.Struct("<IIQI")  # zip64 end of central directory locator, 20 bytes
_END64 = struct.Struct("<IQHHIIQQQQ")  # zip64 end of central directory record, 56 bytes
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, 30 bytes
_SIG_END, _SIG_LOCATOR, _SIG_END64, _SIG_LOCAL = 0x06054B50, 0x07064B50, 0x06064B50, 0x04034B50


def check_archive(path: Path, display: str) -> None:
    """Refuse a zip archive whose records would inflate beyond INFLATION_FLOOR (64 MiB) and
    MAX_INFLATION (100x) their compressed size, one record or all of them together (eight
    records of 60 MiB of zeros each pass a per-record check), from the sizes its central
    directory declares, before anything is inflated (zip readers, torch's included, never
    inflate a record past its declared size); and one not laid out as torch writes (see the
    module), where torch could read other records than those checked.

    Raises PassError(UnsafeModel) naming the record or the layout fault, PassError
    (CorruptModel) for an unreadable zip directory."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as fh:
            infos = archive.infolist()
            fault = _layout_fault(fh, path.stat().st_size, archive.start_dir, infos)
    except (OSError, zipfile.BadZipFile, struct.error) as exc:
        raise _corrupt(display, exc) from None
    if fault:
        raise PassError(
            f"{display}: refused before loading: {fault}, not the layout torch writes: zip "
            "readers would disagree on its records",
            reason=Reason.UnsafeModel,
        )
    packed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
    for info in packed:
        if info.file_size > max(INFLATION_FLOOR, MAX_INFLATION * info.compress_size):
            what = f"record {info.filename!r} declares"
            raise _bomb(display, what, info.file_size, info.compress_size)
    inflated, stored = sum(i.file_size for i in packed), sum(i.compress_size for i in packed)
    if inflated > max(INFLATION_FLOOR, MAX_INFLATION * stored):
        raise _bomb(display, f"its {len(packed)} compressed records declare", inflated, stored)


def _layout_fault(fh, size: int, start: int, infos: list[zipfile.ZipInfo]) -> str | None:  # noqa: ANN001
    """What departs from the layout of the module docstring, or None."""
    if size < _END.size:
        return "no end record"
    fh.seek(size - _END.size)
    end = _END.unpack(fh.read(_END.size))
    if end[0] != _SIG_END or end[7] != 0:
        return "the end record is not the file's last 22 bytes"
    cd_size, cd_offset, directory_end = end[5], end[6], size - _END.size
    locator_at = directory_end - _LOCATOR.size
    if locator_at >= 0:
        fh.seek(locator_at)
        locator = _LOCATOR.unpack(fh.read(_LOCATOR.size))
        if locator[0] == _SIG_LOCATOR:
            record_at = locator[2]
            if record_at != locator_at - _END64.size:
                return f"its zip64 locator names byte {record_at}, not the record before it"
            fh.seek(record_at)
            record = _END64.unpack(fh.read(_END64.size))
            if record[0] != _SIG_END64 or record[1] != _END64.size - 12:
                return "no zip64 end record where its locator points"
            cd_size, cd_offset, directory_end = record[8], record[9], record_at
    if start != cd_offset or cd_offset + cd_size != directory_end:
        return (
            f"its central directory lies at byte {start}, its end records name {cd_offset} "
            f"({cd_size} bytes, ending at {directory_end})"
        )
    limit = cd_offset
    for info in sorted(infos, key=lambda i: i.header_offset, reverse=True):
        fh.seek(info.header_offset)
        local = _LOCAL.unpack(fh.read(_LOCAL.size))
        name = fh.read(local[9])
        if local[0] != _SIG_LOCAL or local[3] != info.compress_type:
            return f"record {info.filename!r}: its local header disagrees with the directory"
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"  # as zipfile decoded it
        if name != info.orig_filename.encode(encoding):
            return f"record {info.filename!r}: its local header names {name[:64]!r}"
        data_end = info.header_offset + _LOCAL.size + local[9] + local[10] + info.compress_size
        if data_end > limit:
            return f"record {info.filename!r} overlaps the next record or the directory"
        limit = info.header_offset
    return None


def _bomb(display: str, what: str, inflated: int, stored: int) -> PassError:
    return PassError(
        f"{display}: refused before loading: {what} {inflated} bytes from {stored} "
        f"compressed ({inflated // max(stored, 1)}x): an archive bomb (torch writes its "
        "records uncompressed)",
        reason=Reason.UnsafeModel,
    )


def _corrupt(display: str, exc: Exception) -> PassError:
    message = " ".join(str(exc).split())[:300]
    return PassError(
        f"{display}: torch cannot read the file: {type(exc).__name__}: {message}",
        reason=Reason.CorruptModel,
    )
