"""ONNX helpers shared by the passes: load, save, walk every graph, name nodes.

Models are untrusted input: a file that does not parse as an ONNX model, or whose external
data is missing or points outside the model's folder (onnx checks this), raises
``PassError(reason=CorruptModel)`` naming the file. Saving picks external data on its own
when the serialized model would not fit in one protobuf message (2 GiB).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import EncodeError
from onnx import GraphProto, ModelProto, NodeProto

from kquant_api import Reason
from kquant_job.errors import PassError

# protobuf refuses to serialize or parse a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31
# Tensors smaller than this stay inside the model file when saving with external data.
EXTERNAL_DATA_THRESHOLD = 1024
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


def load_model(path: Path, *, load_external_data: bool = True) -> ModelProto:
    """Read an ONNX model file.

    External data files are resolved relative to ``path``'s folder; with
    ``load_external_data=False`` tensors stored outside keep only their references (their
    dims and types are still there, enough for shape inference).

    Raises PassError(CorruptModel) naming the file when the bytes are not an ONNX model or
    its external data cannot be read.
    """
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf DecodeError, missing/unsafe external data, I/O
        raise PassError(
            f"{path.name}: not a loadable ONNX model ({type(exc).__name__}: {exc})",
            reason=Reason.CorruptModel,
        ) from exc
    # protobuf parses many byte strings (even an empty file) into a near-empty message.
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise PassError(
            f"{path.name}: not a loadable ONNX model (no ir_version, graph or opset_import)",
            reason=Reason.CorruptModel,
        )
    if not load_external_data:
        check_external_data(model, path)
    return model


def default_opset(model: ModelProto) -> int | None:
    """The model's opset of the default ONNX domain ('' or 'ai.onnx'), or None when it
    names exactly none (or, invalidly, more than one)."""
    found = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return found[0] if len(found) == 1 else None


def check_external_data(model: ModelProto, path: Path) -> None:
    """Check that every tensor stored outside ``model`` names a file inside ``path``'s
    folder that holds its bytes (offset + length within the file).

    Raises PassError(CorruptModel) naming the model file and the data file otherwise.
    """
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    folder = path.parent.resolve()
    for tensor in iter_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        problem = ""
        target = folder / info.location.replace("\x00", "")  # resolve() raises on a NUL
        target = target.resolve()
        if "\x00" in info.location:
            problem = "holds a NUL byte"
        elif not target.is_relative_to(folder):
            problem = "points outside the model's folder"
        elif not target.is_file():
            problem = "is missing"
        elif (info.offset or 0) + (info.length or 0) > target.stat().st_size:
            problem = "is shorter than the tensors it should hold"
        if problem:
            raise PassError(
                f"{path.name}: external data file {info.location!r} of tensor "
                f"{tensor.name!r} {problem}",
                reason=Reason.CorruptModel,
            )


def iter_tensors(model: ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer and tensor-valued attribute (Constant values...) in every graph."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def data_file_for(path: Path) -> Path:
    """The external data file that :func:`save_model` writes beside ``path``:
    ``<model file name>.data``."""
    return path.with_name(path.name + ".data")


def save_model(
    model: ModelProto, path: Path, *, size_limit: int = PROTOBUF_LIMIT, inline: bool = False
) -> list[Path]:
    """Write ``model`` to ``path``; returns the files written (model first, then its data).

    When the serialized model reaches ``size_limit`` bytes (default 2 GiB, protobuf's limit;
    0: always) every tensor of at least 1 KiB goes to one data file ``<file name>.data``
    beside it (location relative, tensors in graph order, so the bytes are deterministic).
    That moves the tensor bytes out of ``model``: afterwards it only references the data
    file. ``inline``: the caller knows the model is under the limit; one file, unsized.

    The model file is written under a temporary name and renamed, so a reader never sees a
    half-written model at ``path``. A stale data file from an earlier save is removed first
    (onnx appends to an existing one).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = data_file_for(path)
    data_path.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # Sizing a message serializes it (0.9 s for 400 MB): not needed when any size will do.
    external = not inline and (size_limit <= 0 or _byte_size(model) >= size_limit)
    try:
        if external:
            onnx.save_model(
                model,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_path.name,
                size_threshold=EXTERNAL_DATA_THRESHOLD,
                convert_attribute=False,
            )
        else:
            tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return [path, data_path] if external and data_path.exists() else [path]


def tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of ``tensor``'s values from its dims and type (4-bit types pack two values a
    byte), without reading them (it may be external or bare); None for strings and unknown
    types."""
    from onnx.helper import tensor_dtype_to_np_dtype

    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        itemsize = tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    count = 1
    for d in tensor.dims:
        count *= max(d, 0)
    packed = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
              getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}  # fmt: skip
    return (count + 1) // 2 if tensor.data_type in packed else count * itemsize


def _byte_size(model: ModelProto) -> int:
    try:
        return model.ByteSize()
    except EncodeError:  # upb will not even size a message of 2 GiB or more
        return PROTOBUF_LIMIT


# Float initializer types by bytes per element (TensorProto data types).
_FLOAT_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8,
                onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}  # fmt: skip
_REDUCED = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def refuse_reduced(model: ModelProto, name: str, precision: str) -> None:
    """Raise PassError(AlreadyQuantized) when most float weight bytes of ``model`` (every
    graph's initializers, sized from their dims: the data need not be loaded) are already
    float16 or bfloat16, for a conversion to ``precision`` ("fp16", "int8"): FP16 again would
    publish the same precision under a new name, and onnxruntime's INT8 quantizers need FP32
    weights (on an FP16 model they fail inside, e.g. "Expected InsertedPrecisionFreeCast_...
    to be an initializer")."""
    by_type: dict[int, int] = {}
    for graph in iter_graphs(model.graph):
        for t in graph.initializer:
            if t.data_type in _FLOAT_BYTES:
                size = math.prod(t.dims) * _FLOAT_BYTES[t.data_type]
                by_type[t.data_type] = by_type.get(t.data_type, 0) + size
    total = sum(by_type.values())
    reduced = {k: v for k, v in by_type.items() if k in _REDUCED}
    if not total or sum(reduced.values()) * 2 <= total:
        return
    dtype = _REDUCED[max(reduced, key=lambda k: reduced[k])]
    held = f"{sum(reduced.values())} of its {total} float weight bytes are {dtype}"
    what = (
        "FP16 again would publish the same precision under a new name"
        if precision == "fp16"
        else "onnxruntime's INT8 quantizers need the FP32 weights"
    )
    raise PassError(
        f"{name} is already a {dtype} model ({held}): {what}. Use it as it is, or convert its "
        "FP32 original; in a model folder, quantization.exclude keeps it as it is",
        reason=Reason.AlreadyQuantized,
    )


# Integer weight types of quantized models, by bits per element.
_INTEGER_BITS = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8,
                 onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}  # fmt: skip


def refuse_integer(model: ModelProto, name: str, quantized_nodes: int) -> None:
    """Raise PassError(AlreadyQuantized) for FP16 of a model already quantized to integers
    (``quantized_nodes`` > 0: QDQ, integer or weight-only ops) whose float weights are too
    few for FP16 to make it smaller than 0.9x: under a fifth of its weight bytes (FP16
    halves them; the 0.9x is gain.MAX_SIZE_RATIO). FP16 of an INT8 Silero VAD was published
    as a new FP16 model at 1.00x the size. Weight bytes are sized from the dims of every
    graph's initializers; a partly quantized model with enough float weights passes."""
    if not quantized_nodes:
        return
    floating = integer = 0.0
    for graph in iter_graphs(model.graph):
        for t in graph.initializer:
            if t.data_type in _FLOAT_BYTES:
                floating += math.prod(t.dims) * _FLOAT_BYTES[t.data_type]
            elif t.data_type in _INTEGER_BITS:
                integer += math.prod(t.dims) * _INTEGER_BITS[t.data_type] / 8
    if not integer or floating >= (floating + integer) / 5:
        return
    raise PassError(
        f"{name} is already quantized ({quantized_nodes} quantized nodes; {int(integer)} of "
        f"its {int(floating + integer)} weight bytes are integers): FP16 would convert only "
        "its float remainder and publish the same model under an FP16 name. Use it as it "
        "is, or convert its float original; in a model folder, quantization.exclude keeps "
        "it as it is",
        reason=Reason.AlreadyQuantized,
    )


def iter_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """``graph`` and, depth first in node order, every subgraph of its If/Loop/Scan (and any
    other graph-valued attribute), recursively."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from iter_graphs(sub)


def subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    """The graphs held directly in ``node``'s attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def iter_nodes(graph: GraphProto) -> Iterator[tuple[GraphProto, NodeProto]]:
    """Every node of ``graph`` and its subgraphs as ``(owning graph, node)``, in the order of
    :func:`iter_graphs`."""
    for g in iter_graphs(graph):
        for node in g.node:
            yield g, node


def name_unnamed_nodes(model: ModelProto) -> int:
    """Give every node without a name a unique one, ``<op_type>_<n>`` with the smallest
    free ``n`` counting per op type, in :func:`iter_nodes` order, so the same model always
    gets the same names. Returns how many nodes were named."""
    taken = {node.name for _, node in iter_nodes(model.graph) if node.name}
    counters: dict[str, int] = {}
    named = 0
    for _, node in iter_nodes(model.graph):
        if node.name:
            continue
        n = counters.get(node.op_type, 0)
        while f"{node.op_type}_{n}" in taken:
            n += 1
        node.name = f"{node.op_type}_{n}"
        counters[node.op_type] = n + 1
        taken.add(node.name)
        named += 1
    return named


def inner_nodes(node: NodeProto) -> Iterator[NodeProto]:
    """Every node inside ``node``'s subgraphs, recursively (none for ordinary ops)."""
    for sub in subgraphs(node):
        for _, inner in iter_nodes(sub):
            yield inner


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the block in a fresh folder inside ``path`` (created), removed afterwards with
    whatever was written there.

    onnxruntime's quantization tools write files into the current directory: symbolic shape
    inference saves its partial model as ``sym_shape_infer_temp.onnx`` when it fails (with
    the model's weights as external data when they are loaded), and some steps write
    UUID-named external data. This keeps them in the job's scratch space, not wherever the
    worker was started (a read-only root in a pod), and not beside the job's files after
    the step.
    """
    import shutil
    import tempfile

    previous = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".cwd-", dir=path)
    os.chdir(scratch)
    try:
        yield
    finally:
        os.chdir(previous)
        shutil.rmtree(scratch, ignore_errors=True)
