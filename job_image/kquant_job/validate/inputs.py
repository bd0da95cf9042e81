"""Input feeds for validation: loaded from ``.npz`` files or generated from the signature.

A *feed* is one ``dict[input name, np.ndarray]`` ready for ``InferenceSession.run``.

Generated values (seeded with ``spec.validation.seed``, so two runs agree):

- float inputs (float16/float32/double): normal with mean 0 and standard deviation 0.5, so
  about 95 % of values lie in [-1, 1]. That covers waveform-like inputs (audio in [-1, 1])
  and normalised ones (zero mean, unit scale) without heavy tails that would overflow FP16
  activations downstream. With ``low``/``high``: uniform in [low, high).
- integer inputs: uniform integers in [0, 8) (``low``/``high`` override), small enough to be
  valid indices into any embedding table or Gather axis of size >= 8.
- bool inputs: fair coin flips.
- ``value``: every element equals it (e.g. ``sr: {value: 16000}``).

Shapes: an override's ``shape``, else the signature's dims, where a symbolic dim takes its
value from ``spec.validation.dimensions`` by name (else 1) and an unnamed dynamic dim is 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kquant_api import ValidationConfig
from kquant_api.spec import InputOverride
from kquant_job.errors import InvalidSpec

Feed = dict[str, np.ndarray]

# onnxruntime's NodeArg.type strings -> numpy dtypes.
_ORT_DTYPES: dict[str, np.dtype] = {
    f"tensor({name})": np.dtype(dt)
    for name, dt in {
        "float": np.float32,
        "float16": np.float16,
        "double": np.float64,
        "int8": np.int8,
        "int16": np.int16,
        "int32": np.int32,
        "int64": np.int64,
        "uint8": np.uint8,
        "uint16": np.uint16,
        "uint32": np.uint32,
        "uint64": np.uint64,
        "bool": np.bool_,
    }.items()
}


def numpy_dtype(ort_type: str) -> np.dtype:
    """The numpy dtype of an onnxruntime type string such as ``"tensor(float)"``.

    Raises InvalidSpec for types kquant cannot feed (strings, sequences, maps, bfloat16...).
    """
    try:
        return _ORT_DTYPES[ort_type]
    except KeyError:
        raise InvalidSpec(f"unsupported model input/output type {ort_type}") from None


def _kind(dtype: np.dtype) -> str:
    """'float', 'int' or 'bool': dtypes of one kind are interchangeable (cast on load)."""
    if dtype.kind == "f":
        return "float"
    if dtype.kind in "iu":
        return "int"
    if dtype.kind == "b":
        return "bool"
    return dtype.kind


def prepare_feeds(model_path: Path, cfg: ValidationConfig, data_files: list[Path]) -> list[Feed]:
    """Feeds for validating ``model_path``: :func:`resolve_feeds`'s feeds."""
    return resolve_feeds(model_path, cfg, data_files)[0]


def resolve_feeds(
    model_path: Path, cfg: ValidationConfig, data_files: list[Path], session: Any | None = None
) -> tuple[list[Feed], ValidationConfig, dict[str, Any] | None]:
    """Feeds for validating ``model_path``, the validation config to use with them (its
    ``feedback`` filled in when discovered) and what was chosen (None with data files).

    With ``data_files`` (local ``.npz`` files, one feed each, array names = input names): up
    to ``cfg.samples`` of them in file-name order, each array cast to the input's dtype.
    Arrays not named after an input are ignored. Without data files: ``cfg.samples`` feeds
    the original runs on, found by :func:`kquant_job.validate.discover.discover` (the spec's
    ``inputs`` and ``dimensions`` win over what it would choose).

    Raises InvalidSpec when a file is unreadable, lacks an input, or holds an array of the
    wrong kind (float/int/bool), rank or fixed dimension; when an override names no input;
    when the original runs on none of the inputs tried (the message says what to add).
    Raises PassError(CorruptModel) when onnxruntime cannot load the model. ``session``: a
    CPU session of the model already made (discovery runs on the CPU), else one is made.
    """
    import onnx

    from kquant_job.validate.compare import make_session
    from kquant_job.validate.discover import discover

    session = session or make_session(model_path, ["CPUExecutionProvider"])
    signature = [(i.name, i.shape, numpy_dtype(i.type)) for i in session.get_inputs()]
    if data_files:
        files = sorted(data_files, key=lambda p: p.name)[: cfg.samples]
        return [load_feed(path, signature) for path in files], cfg, None
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # the session loaded it; the graph is only a hint for token ids
        proto = None
    feeds, feedback, chosen = discover(session, proto, cfg)
    return feeds, cfg.model_copy(update={"feedback": feedback}), chosen


# One sample's arrays, uncompressed: far above any speech window or batch, far below what
# would exhaust the worker's memory (an .npz is a zip: a few KiB can inflate to gigabytes).
MAX_SAMPLE_BYTES = 2**30


def read_npz(path: Path, what: str = "validation data") -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (pickles refused). The uncompressed size declared in
    the zip directory is checked against MAX_SAMPLE_BYTES before anything is inflated
    (zipfile never inflates a member past its declared size). Raises InvalidSpec naming
    ``what`` and the file when the file is not a readable .npz or is too large."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
            if declared <= MAX_SAMPLE_BYTES:
                for info in archive.infolist():
                    _check_header(archive, info, f"{what} {path.name}")
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise InvalidSpec(f"{what} {path.name}: not a readable .npz file ({exc})") from exc
    if declared > MAX_SAMPLE_BYTES:
        raise InvalidSpec(
            f"{what} {path.name}: {declared} bytes of arrays once inflated, over the "
            f"{MAX_SAMPLE_BYTES}-byte bound for one sample"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except Exception as exc:  # zipfile, pickle refusal, truncated data: all the file's fault
        raise InvalidSpec(f"{what} {path.name}: not a readable .npz file ({exc})") from exc


def _check_header(archive: Any, info: Any, where: str) -> None:
    """Raise InvalidSpec when a member's ``.npy`` header declares more bytes (shape times
    item size) than the member holds: numpy allocates the declared array before reading,
    so 64 bytes declaring 2^40 floats ended in MemoryLimitExceeded ("raise the pod's memory
    limit") instead of naming the corrupt file (hostile-input trial). ValueError for a
    header numpy cannot parse."""
    from numpy.lib import format as npy

    if not info.filename.endswith(".npy"):
        return
    with archive.open(info) as fh:
        version = npy.read_magic(fh)
        if version not in ((1, 0), (2, 0)):
            return  # 3.0 (UTF-8 field names): np.load checks it as it reads
        reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = reader(fh)
        start = fh.tell()
    needed = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and needed > info.file_size - start:
        raise InvalidSpec(
            f"{where}: array {info.filename[:-4]!r} declares shape {tuple(shape)} of {dtype} "
            f"({needed} bytes) but holds {info.file_size - start} bytes: a corrupt file"
        )


def load_feed(
    path: Path,
    signature: Sequence[tuple[str, list[Any], np.dtype]],
    what: str = "validation data",
) -> Feed:
    """One feed from an ``.npz`` file (pickles refused), for validation or calibration.

    ``signature``: the model's inputs as ``(name, dims, numpy dtype)``, a dim being an int
    when fixed. Each input needs an array of the same kind (float/int/bool; cast to the
    input's dtype), rank and fixed dims; a scalar may be stored as shape (1,); other arrays
    are ignored. Raises InvalidSpec naming ``what``, the file and the input otherwise.
    """
    arrays = read_npz(path, what)
    feed: Feed = {}
    for name, dims, dtype in signature:
        if name not in arrays:
            raise InvalidSpec(
                f"{what} {path.name}: no array for model input {name!r} "
                f"(has: {', '.join(sorted(arrays)) or 'none'})"
            )
        arr = arrays[name]
        if _kind(arr.dtype) != _kind(dtype):
            raise InvalidSpec(
                f"{what} {path.name}: input {name!r} is {arr.dtype}, "
                f"the model takes {dtype} (a {_kind(dtype)} type)"
            )
        if not dims and arr.size == 1:
            arr = arr.reshape(())  # a scalar input saved as shape (1,) is still one value
        if arr.ndim != len(dims):
            raise InvalidSpec(
                f"{what} {path.name}: input {name!r} has rank {arr.ndim} "
                f"(shape {arr.shape}), the model takes rank {len(dims)} ({_shape_text(dims)})"
            )
        for axis, (want, got) in enumerate(zip(dims, arr.shape, strict=True)):
            if isinstance(want, int) and want > 0 and want != got:
                raise InvalidSpec(
                    f"{what} {path.name}: input {name!r} has shape {arr.shape}, "
                    f"the model fixes axis {axis} to {want} ({_shape_text(dims)})"
                )
        feed[name] = np.array(arr, dtype=dtype, order="C")  # ascontiguousarray makes 0-d 1-d
    return feed


def generate_feeds(
    signature: Sequence[tuple[str, list[Any], np.dtype]], cfg: ValidationConfig
) -> list[Feed]:
    """``cfg.samples`` feeds for inputs ``(name, dims, dtype)``; dims as onnxruntime gives
    them (int, symbolic name or None). Deterministic for a given ``cfg.seed``.

    Raises InvalidSpec for an override naming no input, a shape override whose rank or fixed
    dims disagree with the model, or a non-numeric input type.
    """
    names = [name for name, _, _ in signature]
    unknown = sorted(set(cfg.inputs) - set(names))
    if unknown:
        raise InvalidSpec(
            f"spec.validation.inputs.{unknown[0]}: the model has no such input "
            f"(inputs: {', '.join(names)})"
        )
    shapes = {
        name: _shape(name, dims, cfg.dimensions, cfg.inputs.get(name))
        for name, dims, _ in signature
    }
    rng = np.random.default_rng(cfg.seed)
    return [
        {
            name: _values(rng, name, shapes[name], dtype, cfg.inputs.get(name) or InputOverride())
            for name, _, dtype in signature
        }
        for _ in range(cfg.samples)
    ]


def _shape(
    name: str, dims: list[Any], dimensions: dict[str, int], override: InputOverride | None
) -> tuple[int, ...]:
    if override is not None and override.shape is not None:
        shape = tuple(override.shape)
        fixed = [d if isinstance(d, int) and d > 0 else None for d in dims]
        if len(shape) != len(dims) or any(
            f is not None and f != s for f, s in zip(fixed, shape, strict=True)
        ):
            raise InvalidSpec(
                f"spec.validation.inputs.{name}.shape: {list(shape)} does not fit the "
                f"model's input {_shape_text(dims)}"
            )
        if any(s < 0 for s in shape):
            raise InvalidSpec(f"spec.validation.inputs.{name}.shape: negative dimension")
        return shape
    out = []
    for d in dims:
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif isinstance(d, str) and d:
            out.append(int(dimensions.get(d, 1)))
        else:  # None, 0 or -1: dynamic without a name
            out.append(1)
    return tuple(out)


def _values(
    rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: np.dtype, ov: InputOverride
) -> np.ndarray:
    if ov.value is not None:
        return np.full(shape, ov.value, dtype=dtype)
    kind = _kind(dtype)
    if kind == "bool":
        return rng.random(size=shape) < 0.5
    default_low, default_high = (-1.0, 1.0) if kind == "float" else (0, 8)
    low = default_low if ov.low is None else ov.low
    high = default_high if ov.high is None else ov.high
    if high <= low:
        raise InvalidSpec(f"spec.validation.inputs.{name}: high {high} must exceed low {low}")
    if kind == "int":
        return rng.integers(int(low), int(high), size=shape).astype(dtype)
    if ov.low is None and ov.high is None:
        return (rng.standard_normal(size=shape) * 0.5).astype(dtype)
    return rng.uniform(low, high, size=shape).astype(dtype)


def _shape_text(dims: list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
