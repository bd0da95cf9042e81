"""FP16 conversion of models with external data, one tensor in memory at a time.

onnxruntime's converter casts tensor bytes held inside the model. Given a model with
external data loaded, the process holds the FP32 weights, their FP16 copies and then the
serialized output at once (about 2.5x the model size at peak). Instead:

1. :func:`park_external` replaces every tensor stored outside the model by a one-value
   placeholder (tagged in ``doc_string``) before the converter runs, so the converter only
   decides types: it turns a placeholder to FP16 exactly when it would have converted the
   tensor;
2. :func:`restore_external` puts the references back (dims, location, offset, length) after
   it, with the type the converter chose, and fixes the value_info it derived from the
   placeholder's shape;
3. :func:`save_streaming` writes the model, reading each referenced tensor from the source
   folder and casting FP32 bytes to FP16 where the type now says FLOAT16, with the same
   function the converter uses (``float16.convert_np_to_float16``), into one data file
   beside the model; or, when the result fits in one protobuf message, into the model file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import ModelProto, StringStringEntryProto, TensorProto
from onnx.helper import tensor_dtype_to_np_dtype
from onnxruntime.transformers import float16 as ort_float16

from kquant_job.passes.onnx_common import (
    PROTOBUF_LIMIT,
    data_file_for,
    iter_graphs,
    iter_tensors,
    save_model,
)

_TAG = "kquant-parked:"
ALIGNMENT = 4096  # data offsets on page boundaries: onnxruntime can map them directly


@dataclass
class Parked:
    """A tensor's external reference while the converter runs."""

    dims: list[int]
    doc_string: str
    external_data: list[tuple[str, str]]


def park_external(model: ModelProto) -> list[Parked]:
    """Replace each externally stored tensor of ``model`` (any graph, attributes included)
    by a scalar placeholder of its type; returns what :func:`restore_external` needs."""
    parked: list[Parked] = []
    for tensor in iter_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        entries = [(e.key, e.value) for e in tensor.external_data]
        parked.append(Parked(list(tensor.dims), tensor.doc_string, entries))
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
        del tensor.dims[:]
        tensor.doc_string = f"{_TAG}{len(parked) - 1}"
        # one zero value of the tensor's type: something the converter can read and cast
        tensor.raw_data = np.zeros(1, tensor_dtype_to_np_dtype(tensor.data_type)).tobytes()
    return parked


def restore_external(model: ModelProto, parked: list[Parked]) -> None:
    """Undo :func:`park_external` on the converted ``model``: each placeholder gets its
    dims and external reference back, keeping the data type the converter gave it; a
    value_info declaring a restored initializer as a scalar gets the real shape."""
    restored: dict[str, list[int]] = {}
    for tensor in iter_tensors(model):
        if not tensor.doc_string.startswith(_TAG):
            continue
        info = parked[int(tensor.doc_string[len(_TAG) :])]
        tensor.ClearField("raw_data")
        tensor.dims[:] = info.dims
        tensor.ClearField("doc_string")
        if info.doc_string:
            tensor.doc_string = info.doc_string
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.extend(
            StringStringEntryProto(key=k, value=v) for k, v in info.external_data
        )
        if tensor.name:
            restored[tensor.name] = info.dims
    for graph in iter_graphs(model.graph):
        for vi in (*graph.input, *graph.value_info):
            dims = restored.get(vi.name)
            shape = vi.type.tensor_type.shape
            if dims is not None and vi.type.HasField("tensor_type") and not shape.dim:
                for d in dims:
                    shape.dim.add().dim_value = d


def save_streaming(
    model: ModelProto, path: Path, source_dir: Path, *, inline_limit: int = PROTOBUF_LIMIT - 2**20
) -> list[Path]:
    """Write ``model``, whose external tensors refer to files in ``source_dir``, to
    ``path``; returns the files written (model first, then its data file).

    A tensor typed FLOAT16 whose stored bytes hold 4 bytes per value is cast from FP32
    (:func:`ort_float16.convert_np_to_float16`); other bytes are copied. When the model
    with every tensor inside stays under ``inline_limit`` bytes (2 GiB less 1 MiB of slack
    for the message's own framing) it is written as one file through
    :func:`save_model`; else the tensors go, in graph order, at 4 KiB-aligned offsets, to
    ``<file name>.data`` and the model file refers to it. Peak memory: the model without
    its external tensors plus one tensor (and its FP16 copy), except in the single-file
    case, whose output is below 2 GiB. Raises OSError when a source file cannot be read.
    """
    external = [t for t in iter_tensors(model) if t.data_location == TensorProto.EXTERNAL]
    for tensor in external:
        _fill_length(tensor, source_dir)
    total = model.ByteSize() + sum(_out_bytes(t) for t in external)
    if total < inline_limit:
        for tensor in external:
            tensor.raw_data = _read(tensor, source_dir)
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
        # ``total`` already bounds the size: no second sizing inside save_model
        return save_model(model, path, inline=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = data_file_for(path)
    tmp_data = data_path.with_name(f".{data_path.name}.tmp")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp_data.open("wb") as out:
            for tensor in external:
                offset = -out.tell() % ALIGNMENT + out.tell()
                out.seek(offset)
                data = _read(tensor, source_dir)
                out.write(data)
                where = {"location": data_path.name, "offset": offset, "length": len(data)}
                _set_entries(tensor, [(k, str(v)) for k, v in where.items()])
                del data
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp_data, data_path)
        os.replace(tmp, path)  # the model last: a reader never sees it without its data
    finally:
        tmp_data.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return [path, data_path]


def _set_entries(tensor: TensorProto, entries: list[tuple[str, str]]) -> None:
    del tensor.external_data[:]
    tensor.external_data.extend(StringStringEntryProto(key=k, value=v) for k, v in entries)


def _fill_length(tensor: TensorProto, source_dir: Path) -> None:
    """Write down the stored length of a tensor whose reference omits it (then its bytes
    run to the end of the file)."""
    info = _info(tensor)
    if not info.get("length"):
        size = (source_dir / info["location"]).stat().st_size - int(info.get("offset") or 0)
        tensor.external_data.add(key="length", value=str(size))


def _numel(tensor: TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1


def _info(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _needs_cast(tensor: TensorProto) -> bool:
    info = _info(tensor)
    stored = int(info.get("length") or 0)
    return tensor.data_type == TensorProto.FLOAT16 and stored == 4 * _numel(tensor)


def _out_bytes(tensor: TensorProto) -> int:
    stored = int(_info(tensor).get("length") or 0)
    return stored // 2 if _needs_cast(tensor) else stored


def _read(tensor: TensorProto, source_dir: Path) -> bytes:
    info = _info(tensor)
    with (source_dir / info["location"]).open("rb") as f:
        f.seek(int(info.get("offset") or 0))
        data = f.read(int(info["length"]))
    if _needs_cast(tensor):
        fp32 = np.frombuffer(data, dtype=np.float32)
        return ort_float16.convert_np_to_float16(fp32).tobytes()
    return data
