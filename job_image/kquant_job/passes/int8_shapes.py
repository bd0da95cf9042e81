"""Shape inference for onnxruntime's dynamic quantizer without a second copy of the weights.

``ONNXQuantizer.__init__`` (onnxruntime 1.31, ``quantization/onnx_quantizer.py``), in dynamic
mode, calls ``save_and_reload_model_with_shape_infer(self.model.model)`` and quantizes the
model it returns. That helper deep-copies the model, saves it with external data to a
temporary folder, runs ``onnx.shape_inference.infer_shapes_path`` on the file (the weights
stay in their data file there) and loads it back with the weights: on BERT-base 2.1 s, and
the caller's model stays alive beside the copy (two copies of 417 MiB at the peak of an INT8
job). :func:`with_inferred_shapes` gives the model the same inferred value infos, inputs and
outputs in place, from ``infer_shapes`` run on a copy of the graph whose large tensors carry
no bytes (as in the helper's saved file); :func:`light_shape_reload` installs it for one
quantizer call. In place is what the quantizer already does to that model
(``replace_gemm_with_matmul`` just before). Large tensors get the explicit
``data_location: DEFAULT`` onnx's loader leaves on what it read back, so the bytes written
match.

The quantized model is byte for byte the same (``tests/unit/test_int8_shapes.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onnx import ModelProto, TensorProto

from kquant_job.passes.onnx_common import iter_graphs, tensor_bytes

__all__ = [
    "light_shape_reload",
    "load_with_inferred_shapes",
    "value_infos_only",
    "verified_onnxruntime",
    "with_inferred_shapes",
]

# onnx.save_model's default size_threshold compares sys.getsizeof(raw_data), 33 bytes more
# than its length, with 1024: tensors of at least this many bytes go to the data file.
_EXTERNAL_FROM = 1024 - 33


def value_infos_only(model: ModelProto) -> ModelProto:
    """``model``'s graph after ONNX shape inference (default options, as
    ``infer_shapes_path``), its tensors (every graph's) of at least 991 bytes of ``raw_data``
    left without bytes (marked external, as the helper's saved file holds them): only its
    ``graph.value_info``, ``graph.input`` and ``graph.output`` are of use. Raises what
    ``onnx.shape_inference.infer_shapes`` raises."""
    import onnx

    light = ModelProto(ir_version=model.ir_version, producer_name=model.producer_name,
                       producer_version=model.producer_version, domain=model.domain,
                       model_version=model.model_version)  # fmt: skip
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, src = light.graph, model.graph
    graph.name = src.name
    graph.node.extend(src.node)
    graph.input.extend(src.input)
    graph.output.extend(src.output)
    graph.value_info.extend(src.value_info)
    graph.sparse_initializer.extend(src.sparse_initializer)
    # the main graph's weights are never copied; subgraphs' come with their nodes
    graph.initializer.extend(_without_bytes(t) if _large(t) else t for t in src.initializer)
    for sub in iter_graphs(graph):  # the copy's subgraphs too, as onnx.save_model does
        for i, tensor in enumerate(sub.initializer):
            if _large(tensor):
                sub.initializer[i].CopyFrom(_without_bytes(tensor))
    return onnx.shape_inference.infer_shapes(light)


def _take_inferred(model: ModelProto) -> None:
    """Give ``model`` the ``value_info``, ``input`` and ``output`` of every graph from
    :func:`value_infos_only`, in place."""
    inferred = value_infos_only(model).graph
    for graph, done in zip(iter_graphs(model.graph), iter_graphs(inferred), strict=True):
        for field in ("value_info", "input", "output"):
            target = getattr(graph, field)
            del target[:]
            target.extend(getattr(done, field))


def load_with_inferred_shapes(model_path: Path | str) -> ModelProto:
    """What onnxruntime's ``load_model_with_shape_infer(model_path)`` returns (``quantize_
    dynamic``'s first step: ``infer_shapes_path`` into ``<name>-inferred.onnx`` beside the
    model, a load of that file with its weights, its removal, ``add_infer_metadata``),
    without the file: the model is loaded once, its shapes inferred in memory. The library
    writes the whole model beside its input, which for a source read in place is the
    user's folder (and there the sandbox forbids it), and reads it back. Raises what
    ``onnx.load`` and ``infer_shapes`` raise."""
    import onnx
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    model = onnx.load(str(model_path))  # external data from the model's own folder
    _take_inferred(model)
    add_infer_metadata(model)
    return model


def with_inferred_shapes(model: ModelProto) -> ModelProto:
    """``model`` itself, its ``graph.value_info``, ``graph.input`` and ``graph.output``
    replaced by those of :func:`value_infos_only` and the metadata onnxruntime's loader adds
    (``onnx.infer: onnxruntime.quant``): what ``save_and_reload_model_with_shape_infer``
    returns, without the copy. Raises what ``infer_shapes`` raises."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    _take_inferred(model)
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            if _large(tensor):  # onnx's loader sets it on every tensor it read back
                tensor.data_location = TensorProto.DEFAULT
    add_infer_metadata(model)
    return model


# onnxruntime releases whose quantizer was checked to give the same bytes through the shim
# (tests/unit/test_int8_shapes.py); others keep the library's own path.
VERIFIED_ONNXRUNTIME = ("1.31.",)


def verified_onnxruntime() -> bool:
    """Whether the installed onnxruntime is a release in :data:`VERIFIED_ONNXRUNTIME`, whose
    quantization tools kquant's shims (this module, :mod:`~kquant_job.passes.int8_optimize`)
    were checked against."""
    import onnxruntime

    return onnxruntime.__version__.startswith(VERIFIED_ONNXRUNTIME)


@contextmanager
def light_shape_reload() -> Iterator[None]:
    """For the duration of the block, onnxruntime's dynamic quantizer gets its shapes from
    :func:`with_inferred_shapes` instead of a save and reload of the whole model, and
    ``quantize_dynamic`` loads its input with :func:`load_with_inferred_shapes` (no
    ``-inferred`` copy written beside it); a no-op on an onnxruntime release not in
    VERIFIED_ONNXRUNTIME or without the helpers."""
    import importlib

    import onnxruntime.quantization.onnx_quantizer as onnx_quantizer

    # the module: the package exports a function of the same name, which ``import ... as``
    # would bind
    quantize = importlib.import_module("onnxruntime.quantization.quantize")
    shims = [
        (onnx_quantizer, "save_and_reload_model_with_shape_infer", with_inferred_shapes),
        (quantize, "load_model_with_shape_infer", load_with_inferred_shapes),
    ]
    originals: list[Any] = [getattr(module, name, None) for module, name, _ in shims]
    if any(o is None for o in originals) or not verified_onnxruntime():
        yield
        return
    for module, name, shim in shims:
        setattr(module, name, shim)
    try:
        yield
    finally:
        for (module, name, _), original in zip(shims, originals, strict=True):
            setattr(module, name, original)


def _large(tensor: TensorProto) -> bool:
    if not tensor.HasField("raw_data") or tensor.data_location == TensorProto.EXTERNAL:
        return False
    size = tensor_bytes(tensor)  # raw_data's length, without copying it out
    return size is not None and size >= _EXTERNAL_FROM  # strings, unknown types: kept


def _without_bytes(tensor: TensorProto) -> TensorProto:
    bare = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims),
                       data_location=TensorProto.EXTERNAL)  # fmt: skip
    entry = bare.external_data.add()
    entry.key, entry.value = "location", "not-loaded"
    return bare
