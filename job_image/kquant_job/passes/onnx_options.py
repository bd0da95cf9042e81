"""The users' onnxruntime recipes, checked before any conversion: ``extraOptions`` keys
against the ones onnxruntime documents, and every op type or node name a spec lists against
the models of the job (a name that matches nothing is a typo that would silently do
nothing)."""

from __future__ import annotations

import inspect
import re
from functools import cache
from pathlib import Path
from typing import Any

from kquant_api import Int8Mode, Precision, QuantizationConfig
from kquant_job.errors import InvalidSpec

# "    ActivationSymmetric = True/False: ..." in the extra_options part of the docstrings
_OPTION = re.compile(r"^\s+([A-Z][A-Za-z0-9]+) = ", re.MULTILINE)


@cache
def extra_option_keys(mode: Int8Mode) -> frozenset[str]:
    """The ``extra_options`` keys onnxruntime documents for ``quantize_dynamic`` or
    ``quantize_static`` (read from the installed onnxruntime's docstrings, so the list
    follows its version)."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    func = quantize_dynamic if mode is Int8Mode.dynamic else quantize_static
    doc = inspect.getdoc(func) or ""
    return frozenset(_OPTION.findall(doc.split("extra_options", 1)[-1]))


def extra_options(config: QuantizationConfig) -> dict[str, Any]:
    """The spec's ``extraOptions`` for onnxruntime. Raises InvalidSpec naming a key
    onnxruntime does not document for the mode."""
    options = dict(config.extraOptions or {})
    known = extra_option_keys(config.int8_mode)
    for key in options:
        if key not in known:
            raise InvalidSpec(
                f"spec.quantization.extraOptions.{key}: not an extra option of onnxruntime's "
                f"{config.int8_mode.value} quantization (it knows: {', '.join(sorted(known))})"
            )
    return options


def check_names(config: QuantizationConfig, models: list[Path]) -> None:
    """Every op type (opBlockList, opTypesToQuantize) and node name (nodeBlockList,
    nodesToExclude) the spec lists must occur in one of the ONNX ``models`` of the job.
    Raises InvalidSpec naming the field, the name and what the models hold. Nothing is
    loaded when the spec names nothing (a parse of a 400 MB embedded model takes 0.6 s)."""
    fields: list[tuple[str, list[str] | None, str]] = []
    if config.precision is Precision.fp16:
        fields = [("opBlockList", config.opBlockList, "op type"),
                  ("nodeBlockList", config.nodeBlockList, "node")]  # fmt: skip
    elif config.precision is Precision.int8:
        fields = [("opTypesToQuantize", config.opTypesToQuantize, "op type"),
                  ("nodesToExclude", config.nodesToExclude, "node")]  # fmt: skip
    if not models or not any(listed for _, listed, _ in fields):
        return
    # onnx is imported here, not at module level: the worker's parent imports this module
    # (through stage.py's outcome types) and never loads onnx itself.
    from kquant_job.passes.onnx_common import iter_nodes, load_model

    ops: set[str] = set()
    names: set[str] = set()
    for path in models:
        graph = load_model(path, load_external_data=False).graph
        for _, node in iter_nodes(graph):
            ops.add(node.op_type)
            names.add(node.name)
    for field, listed, what in fields:
        present = ops if what == "op type" else names
        for name in listed or []:
            if name not in present:
                shown = ", ".join(sorted(ops)) if what == "op type" else _some(names)
                raise InvalidSpec(
                    f"spec.quantization.{field}: {what} {name!r} occurs in no model of this "
                    f"job (its {what}s: {shown})"
                )


def _some(names: set[str], limit: int = 12) -> str:
    shown = sorted(n for n in names if n)[:limit]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
