"""Move an ONNX file's embedded weights to a data file without loading the model.

``onnx.load`` reads the whole file and parses it: a model of N bytes costs 2N of memory at
that moment (the bytes and the message), and saving it with external data then serializes
it once more. :func:`spill_weights` walks the protobuf wire format instead (the encoding of
https://protobuf.dev/programming-guides/encoding/; field numbers from onnx.proto3:
``ModelProto.graph`` = 7, ``GraphProto.initializer`` = 5): every field is copied as it is,
except the main graph's initializers: each is walked in turn, its ``raw_data`` (field 9 of
``TensorProto``) copied to the data file by the kernel (``copy_file_range``; read and written
in chunks where the kernel cannot) and replaced by an external-data reference, as
``onnx.save_model(..., save_as_external_data=True, all_tensors_to_one_file=True,
size_threshold=1024, convert_attribute=False)`` writes it; the tensor's other fields are
parsed (``TensorProto``) to check them. Memory: the graph without its weights; the weights
never pass through Python (BERT-base, 417 MiB: 1.4 s before, when each tensor was parsed
whole and written from Python). Initializers of subgraphs (If/Loop bodies) and tensors
stored as typed fields (``float_data``...) stay in the file, as with onnx.

The walk trusts nothing: every length is checked against the bytes that enclose it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

from kquant_api import Reason
from kquant_job.errors import PassError
from kquant_job.passes.onnx_common import EXTERNAL_DATA_THRESHOLD, data_file_for, load_model

__all__ = ["spill_weights"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_BUFFER = 1 << 20


class _Corrupt(Exception):
    """The bytes are not a well-formed protobuf message."""


def spill_weights(src: Path, dst: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write ``src`` (an ONNX file, weights embedded) to ``dst`` with each main-graph
    initializer of at least ``threshold`` bytes of ``raw_data`` in ``<dst name>.data``
    beside it, in graph order. Returns ``[dst, data file]``.

    The model file is written under a temporary name and renamed; a stale data file is
    replaced. Raises PassError(CorruptModel) naming ``src`` when its bytes are not a
    well-formed ONNX model (a length past its enclosing message, a bad varint, a tensor
    that does not parse, no graph).
    """
    data_path = data_file_for(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with open(src, "rb", buffering=_BUFFER) as f, open(data_path, "wb") as data:
            model = _model(f, src.stat().st_size, data, data_path.name, threshold)
        tmp.write_bytes(model)
        os.replace(tmp, dst)
    except _Corrupt as exc:
        raise PassError(
            f"{src.name}: not a loadable ONNX model ({exc})", reason=Reason.CorruptModel
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    load_model(dst, load_external_data=False)  # the rest parses, references stay inside
    return [dst, data_path]


def _model(f: BinaryIO, end: int, data: BinaryIO, location: str, threshold: int) -> bytes:
    out, graphs = bytearray(), 0
    while f.tell() < end:
        field, wire, header, length = _field(f, end)
        if field == _MODEL_GRAPH and wire == _LEN:
            graph = _graph(f, f.tell() + length, data, location, threshold)
            out += _key(field, _LEN) + _varint_bytes(len(graph)) + graph
            graphs += 1
        else:
            out += header + _read(f, length)
    if graphs != 1:
        raise _Corrupt(f"{graphs} graph fields, not one")
    return bytes(out)


def _graph(f: BinaryIO, end: int, data: BinaryIO, location: str, threshold: int) -> bytes:
    out = bytearray()
    while f.tell() < end:
        field, wire, header, length = _field(f, end)
        if field == _GRAPH_INITIALIZER and wire == _LEN:
            blob = _initializer(f, f.tell() + length, data, location, threshold)
            out += _key(field, _LEN) + _varint_bytes(len(blob)) + blob
        else:
            out += header + _read(f, length)
    if f.tell() != end:
        raise _Corrupt("a field runs past the graph")
    return bytes(out)


def _initializer(f: BinaryIO, end: int, data: BinaryIO, location: str, threshold: int) -> bytes:
    """The initializer ending at ``end``, its raw_data moved to ``data`` when it has one
    ``raw_data`` field of at least ``threshold`` bytes and is not external already; as it
    is otherwise."""
    from onnx import TensorProto

    start, rest, raw = f.tell(), bytearray(), []
    while f.tell() < end:
        field, wire, header, length = _field(f, end)
        if field == _TENSOR_RAW_DATA and wire == _LEN:
            raw.append((f.tell(), length))
            f.seek(length, io.SEEK_CUR)
        else:
            rest += header + _read(f, length)
    if f.tell() != end:
        raise _Corrupt("a field runs past an initializer")
    try:
        tensor = TensorProto.FromString(bytes(rest))
    except Exception as exc:  # protobuf DecodeError
        raise _Corrupt(f"an initializer does not parse: {exc}") from None
    moves = len(raw) == 1 and raw[0][1] >= threshold
    if not moves or tensor.data_location == TensorProto.EXTERNAL:
        f.seek(start)  # kept as it is
        return _read(f, end - start)
    offset, length = raw[0]
    # the entries and their order of onnx's set_external_data
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", data.tell()), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    _copy_range(f, offset, length, data)
    return tensor.SerializeToString()


def _copy_range(f: BinaryIO, offset: int, length: int, data: BinaryIO) -> None:
    """Append ``length`` bytes of ``f`` from ``offset`` to ``data`` (its position advances;
    ``f``'s does not)."""
    data.flush()
    src, dst = f.fileno(), data.fileno()
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src, dst, length - done, offset + done)
            if n == 0:
                raise _Corrupt("the file ends inside a field")
            done += n
    except OSError:  # no kernel copy between these files (ENOSYS, EXDEV, EINVAL)
        while done < length:
            chunk = os.pread(src, min(_BUFFER, length - done), offset + done)
            if not chunk:
                raise _Corrupt("the file ends inside a field") from None
            data.write(chunk)
            done += len(chunk)
    data.seek(0, io.SEEK_END)


def _field(f: BinaryIO, end: int) -> tuple[int, int, bytes, int]:
    """The next field before ``end``: (number, wire type, the bytes read so far, bytes of
    value still to read). For a length-delimited field the header holds the key and the
    length; for the others it holds the whole field."""
    key, raw = _varint(f)
    field, wire = key >> 3, key & 7
    if field == 0:
        raise _Corrupt("field number 0")
    if wire == _VARINT:
        _, value = _varint(f)
        return field, wire, raw + value, 0
    if wire in (_I64, _I32):
        length = 8 if wire == _I64 else 4
    elif wire == _LEN:
        length, size = _varint(f)
        raw += size
    else:
        raise _Corrupt(f"wire type {wire} (groups are not ONNX)")
    if f.tell() + length > end:
        raise _Corrupt("a field runs past its message")
    return field, wire, raw, length


def _varint(f: BinaryIO) -> tuple[int, bytes]:
    value, raw = 0, bytearray()
    for shift in range(0, 70, 7):
        byte = f.read(1)
        if not byte:
            raise _Corrupt("the file ends inside a varint")
        raw += byte
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value, bytes(raw)
    raise _Corrupt("a varint longer than 10 bytes")


def _read(f: BinaryIO, length: int) -> bytes:
    blob = f.read(length)
    if len(blob) != length:
        raise _Corrupt("the file ends inside a field")
    return blob


def _key(field: int, wire: int) -> bytes:
    return _varint_bytes(field << 3 | wire)


def _varint_bytes(value: int) -> bytes:
    out = io.BytesIO()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.write(bytes((byte | 0x80,)))
        else:
            out.write(bytes((byte,)))
            return out.getvalue()
