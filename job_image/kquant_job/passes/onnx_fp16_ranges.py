"""Values FP16 cannot hold, found before the first FP16 conversion (step 0 of onnx_fp16).

- Weights: FP32 initializers and tensor attributes with ``|x| > 65504``, inf or nan. Both
  common converters would clamp them to 65504 without a word.
- Activations: values whose measured range on the validation samples
  (:func:`kquant_job.validate.ranges.activation_ranges`, the FP32 original) exceeds
  ``65504 / ACTIVATION_HEADROOM``: in FP16 they would become inf on a GPU, while
  onnxruntime's CPU provider (which computes these ops in FP32) would not show it.

- Initializers named by an explicit ``keepFp32`` (the user's choice).

Either way the nodes producing and reading such a value are kept FP32; with all its
consumers blocked, onnxruntime's converter leaves an initializer FP32 (float16.py converts
an initializer only when its InitializerTracker has fp16_nodes), and between blocked nodes
a value stays FP32 (onnx_fp16_convert).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper

from kquant_job.passes.onnx_common import iter_graphs, iter_nodes
from kquant_job.passes.torch_common import keep_pattern

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
# Production inputs can be louder than the validation samples: a value measured above half
# the FP16 range is kept FP32 (one spare exponent step).
ACTIVATION_HEADROOM = 2.0


def _consumers(model: ModelProto) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, node in iter_nodes(model.graph):
        for name in node.input:
            out.setdefault(name, []).append(node.name)
    return out


def scan_out_of_range(model: ModelProto, base_dir: Path) -> tuple[dict[str, float | str], set[str]]:
    """Find FP32 tensors that FP16 cannot hold: finite ``|x| > 65504``, inf or nan.

    Looks at float initializers of every graph (external data read from ``base_dir`` one
    tensor at a time) and at tensor attributes of nodes (Constant ``value`` and the like).
    Returns ``({tensor name: max |x|, or "inf"/"nan"}, node names to keep FP32)``: every
    consumer of such an initializer, and the node holding such an attribute with the
    consumers of its output.
    """
    consumers = _consumers(model)
    found: dict[str, float | str] = {}
    block: set[str] = set()
    for graph in iter_graphs(model.graph):
        for init in graph.initializer:
            if init.data_type == TensorProto.FLOAT:
                worst = _out_of_range(numpy_helper.to_array(init, str(base_dir)))
                if worst is not None:
                    found[init.name] = worst
                    block.update(consumers.get(init.name, []))
        for node in graph.node:
            for attr in node.attribute:
                if (
                    attr.type == onnx.AttributeProto.TENSOR
                    and attr.t.data_type == TensorProto.FLOAT
                ):
                    worst = _out_of_range(numpy_helper.to_array(attr.t, str(base_dir)))
                    if worst is not None:
                        found[node.output[0] if node.output else node.name] = worst
                        block.add(node.name)
                        for out in node.output:
                            block.update(consumers.get(out, []))
    return found, block


def _out_of_range(values: np.ndarray) -> float | str | None:
    if values.size == 0:
        return None
    if not np.isfinite(values).all():
        return "nan" if np.isnan(values).any() else "inf"
    worst = float(np.abs(values).max())
    return worst if worst > FP16_MAX else None


def scan_activations(
    model: ModelProto, ranges: dict[str, float], headroom: float = ACTIVATION_HEADROOM
) -> tuple[dict[str, float], set[str]]:
    """Find values of ``model`` whose measured range (``{value name: max |x|}``) exceeds
    ``65504 / headroom``. Returns ``({value name: max |x|}, node names to keep FP32)``:
    the node producing each such value and every node reading it (in any graph)."""
    limit = FP16_MAX / headroom
    producer = {out: node.name for _, node in iter_nodes(model.graph) for out in node.output}
    consumers = _consumers(model)
    found = {name: worst for name, worst in sorted(ranges.items()) if worst > limit}
    block: set[str] = set()
    for name in found:
        if name in producer:
            block.add(producer[name])
        block.update(consumers.get(name, []))
    return found, block


def scan_kept(model: ModelProto, patterns: list[str]) -> tuple[dict[str, str], set[str]]:
    """Float initializers (any graph) named by a keepFp32 glob pattern (matched as for the
    PyTorch passes: the dotted name or any dotted suffix, :func:`keep_pattern`). Returns
    ``({initializer name: pattern}, node names to keep FP32)``: every node reading one."""
    consumers = _consumers(model)
    kept: dict[str, str] = {}
    block: set[str] = set()
    for graph in iter_graphs(model.graph):
        for init in graph.initializer:
            if init.data_type != TensorProto.FLOAT:
                continue
            pattern = keep_pattern(init.name, patterns)
            if pattern is not None:
                kept[init.name] = pattern
                block.update(consumers.get(init.name, []))
    return dict(sorted(kept.items())), block
