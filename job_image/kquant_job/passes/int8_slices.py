"""onnxruntime's weight quantization in slices: the same arithmetic, a fraction of its memory.

``quantize_nparray`` (onnxruntime 1.31, ``quantization/quant_utils.py``) quantizes a whole
tensor in one numpy expression, ``((arr.astype(float32) / scale).round() + zero_point)``,
clipped, then cast: two float temporaries the size of the tensor are alive at once, beside
the caller's copy of the weight and its flattened copy. On BERT-base the 94 MiB word
embeddings (quantized for ``Gather``) put 376 MiB of temporaries on top of the model: the
peak of a whole INT8 job. :func:`sliced_weight_quantization` makes the library quantize a
large one-dimensional tensor with one scale and one zero point slice by slice, calling its
own ``quantize_nparray`` on each slice into one preallocated output. The expression is
elementwise, so every element is computed exactly as before
(``tests/unit/test_int8_slices.py`` compares bytes, and whole quantized models).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from kquant_job.passes.int8_shapes import verified_onnxruntime

__all__ = ["SLICE_ELEMENTS", "sliced", "sliced_weight_quantization"]

SLICE_ELEMENTS = 1 << 20  # 4 MiB of float32 per temporary


def sliced(whole: Callable[..., Any]) -> Callable[..., Any]:
    """``whole`` (onnxruntime's ``quantize_nparray(qType, arr, scale, zero_point, low=None,
    high=None)``) applied slice by slice to a one-dimensional ``arr`` of more than
    :data:`SLICE_ELEMENTS` elements whose ``scale`` and ``zero_point`` hold one value each;
    any other call (per-channel parameters, several dimensions, small tensors, float 8 types,
    which the library evaluates through a reference model) goes to ``whole`` unchanged.
    Returns an array of the dtype and shape ``whole`` returns; raises what it raises."""

    def quantize_nparray(
        qType: int,  # the library's parameter names: some callers pass them by keyword
        arr: Any,
        scale: Any,
        zero_point: Any,
        low: Any = None,
        high: Any = None,
    ) -> Any:
        if not _sliceable(qType, arr, scale, zero_point):
            return whole(qType, arr, scale, zero_point, low, high)
        out: np.ndarray | None = None
        for start in range(0, arr.shape[0], SLICE_ELEMENTS):
            part = whole(qType, arr[start : start + SLICE_ELEMENTS], scale, zero_point, low, high)
            if out is None:
                out = np.empty(arr.shape, dtype=part.dtype)
            out[start : start + part.shape[0]] = part
        return out

    return quantize_nparray


def _sliceable(qtype: int, arr: Any, scale: Any, zero_point: Any) -> bool:
    from onnx import TensorProto

    integer = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
               TensorProto.INT4, TensorProto.UINT4)  # fmt: skip
    return (
        qtype in integer
        and isinstance(arr, np.ndarray)
        and arr.ndim == 1
        and arr.shape[0] > SLICE_ELEMENTS
        and np.size(scale) == 1
        and np.size(zero_point) == 1
    )


@contextmanager
def sliced_weight_quantization() -> Iterator[None]:
    """For the duration of the block, onnxruntime's quantizers (``quantize_data`` and the
    weight quantizer's own calls) quantize through :func:`sliced`; a no-op on an onnxruntime
    release not in ``int8_shapes.VERIFIED_ONNXRUNTIME``. Not thread-safe: it swaps module
    attributes, as the worker's single-threaded sandboxed child allows."""
    from onnxruntime.quantization import base_quantizer, quant_utils

    original = getattr(quant_utils, "quantize_nparray", None)
    if original is None or not verified_onnxruntime():
        yield
        return
    modules = [m for m in (quant_utils, base_quantizer) if m.quantize_nparray is original]
    replacement = sliced(original)
    for module in modules:
        module.quantize_nparray = replacement
    try:
        yield
    finally:
        for module in modules:
            module.quantize_nparray = original
