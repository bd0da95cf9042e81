"""FP16/BF16 conversion of a TorchScript module (``torch.jit.save`` archive, e.g.
``silero_vad.jit``).

Parameters and buffers are cast (except those named by ``keepFp32``; a module holding a kept
tensor keeps all its own tensors FP32, since its operators take one dtype: a BatchNorm with
FP32 running statistics needs FP32 weight and bias), then the module's graphs get run-time
casts so that callers keep FP32 inputs and outputs
(:mod:`kquant_job.passes.torch_jit_cast`). The result is saved with ``torch.jit.save``
and loaded back once to prove it loads.

Tensor attributes that are neither parameters nor buffers (a streaming model's state, such
as Silero's ``_state`` and ``_context``) are left as they are: the code resets them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from kquant_api import ModelFormat, QuantizationConfig, Reason
from kquant_job.errors import PassError
from kquant_job.passes.base import PassContext, PassResult
from kquant_job.passes.torch_common import (
    castable,
    check_archive,
    keep_pattern,
    require_torch,
    target_dtype,
    tensor_bytes,
)
from kquant_job.pinned import note_model_code, read_pinned, write_pinned

MAX_LISTED = 50


def load_script(path: Path, display: str, map_location: str = "cpu") -> Any:
    """``torch.jit.load`` on ``map_location`` (CPU by default: a module saved on a GPU loads
    on a CPU-only machine), after :func:`check_archive`; a file this process wrote
    (:func:`save_script`) is loaded from its pinned bytes (:mod:`kquant_job.pinned`). Raises
    PassError(CorruptModel) with torch's message, PassError(UnsafeModel) for an archive bomb
    or a pinned file whose bytes changed."""
    import io

    torch = require_torch()
    pinned = read_pinned(path)
    if pinned is None:
        check_archive(path, display)
    note_model_code()  # __setstate__ runs on load, forward on use
    try:
        source = str(path) if pinned is None else io.BytesIO(pinned)
        return torch.jit.load(source, map_location=map_location)
    except Exception as exc:
        message = " ".join(str(exc).split())[:300]
        raise PassError(
            f"{display}: torch.jit.load cannot read the module: {message}",
            reason=Reason.CorruptModel,
        ) from None


def save_script(module: Any, path: Path) -> str:
    """``torch.jit.save`` of ``module`` into memory, then written to ``path`` and pinned
    (:func:`kquant_job.pinned.write_pinned`: model code cannot change what is published
    unseen); returns the SHA-256 (hex). Raises what ``torch.jit.save`` raises."""
    import io

    torch = require_torch()
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return write_pinned(path, buffer.getvalue())


def _own_tensors(module: Any) -> list[tuple[str, Any]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def plan_kept(module: Any, patterns: list[str]) -> dict[str, str]:
    """Dotted names of the floating tensors kept FP32 -> why: ``keepFp32 '<pattern>'``, or
    ``module of <name>`` for the other tensors of a module that holds a kept one."""
    kept: dict[str, str] = {}
    for prefix, sub in module.named_modules():
        own = [(f"{prefix}.{n}" if prefix else n, t) for n, t in _own_tensors(sub)]
        matched = {
            name: f"keepFp32 {pattern!r}"
            for name, t in own
            if castable(t) and (pattern := keep_pattern(name, patterns))
        }
        if matched:
            first = next(iter(matched))
            for name, t in own:
                if castable(t):
                    kept[name] = matched.get(name, f"module of {first}")
    return kept


def cast_module(module: Any, dtype: Any, kept: dict[str, str]) -> dict[str, int]:
    """Cast the floating parameters and buffers of ``module`` not in ``kept`` to ``dtype``
    in place (``tensor.data`` swapped, so lists holding them, like an LSTM's
    ``_flat_weights``, see the new data). Returns counts and bytes before/after."""
    seen: set[int] = set()
    stats = {"tensorsCast": 0, "bytesBefore": 0, "bytesAfter": 0}
    named = [*module.named_parameters(), *module.named_buffers()]
    for name, tensor in named:
        if id(tensor) in seen or name in kept or not castable(tensor):
            continue
        seen.add(id(tensor))
        stats["bytesBefore"] += tensor_bytes(tensor)
        tensor.data = tensor.data.to(dtype)
        stats["bytesAfter"] += tensor_bytes(tensor)
        stats["tensorsCast"] += 1
    return stats


class TorchScriptPass:
    """Cast a TorchScript module to FP16 or BF16, keeping FP32 inputs and outputs."""

    name: ClassVar[str] = "torchscript-cast"
    formats: ClassVar[frozenset[ModelFormat]] = frozenset({ModelFormat.torchscript})

    def run(
        self, model_in: Path, config: QuantizationConfig, out_path: Path, ctx: PassContext
    ) -> PassResult:
        """Write the converted module to ``out_path``.

        Raises PassError(CorruptModel) when the archive does not load, PassError
        (ConversionFailed) when the graphs cannot be patched or the result does not save and
        load back, PassError(UnsupportedFormat) when torch is missing.
        """
        from kquant_job.passes.torch_jit_cast import cast_graphs

        require_torch()
        dtype = target_dtype(config.precision)
        module = load_script(model_in, model_in.name)
        kept = plan_kept(module, config.keep_fp32)
        stats = cast_module(module, dtype, kept)
        try:
            graphs = cast_graphs(module)
            save_script(module, out_path)
            load_script(out_path, out_path.name)
        except PassError as exc:
            if exc.reason is Reason.UnsafeModel:
                raise  # the saved bytes changed: model code, not the conversion
            raise PassError(
                f"{model_in.name}: the {dtype} module does not load back: {exc}",
                reason=Reason.ConversionFailed,
            ) from None
        except Exception as exc:
            message = " ".join(str(exc).split())[:300]
            raise PassError(
                f"{model_in.name}: the {dtype} module could not be built: {message}",
                reason=Reason.ConversionFailed,
            ) from None
        details: dict[str, Any] = {
            "dtype": str(dtype).replace("torch.", ""),
            **stats,
            "keepFp32": list(config.keep_fp32),
            "keptCount": len(kept),
            "kept": [{"name": n, "why": w} for n, w in list(kept.items())[:MAX_LISTED]],
            "io": "inputs as before (cast inside, before each operator that uses a parameter); "
            "FP16/BF16 outputs returned as FP32",
            **graphs,
        }
        ctx.log.info(
            "cast %d tensors of %s to %s; %d casts inserted",
            stats["tensorsCast"],
            model_in.name,
            details["dtype"],
            graphs["weightCasts"],
        )
        return PassResult(out_path, details)
