"""FP16/BF16 cast of a ``.safetensors`` file, with the ``safetensors`` library.

safetensors holds a flat name -> tensor table and a str -> str metadata header; it cannot
hold code, so loading is safe by construction. Tensors are read one at a time
(``safe_open``, memory-mapped); FP32/FP64 tensors not named by ``keepFp32`` are cast, the
others kept; the metadata header is written back unchanged (``save_file(metadata=...)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from kquant_api import ModelFormat, QuantizationConfig, Reason
from kquant_job.errors import PassError
from kquant_job.passes.base import PassContext, PassResult
from kquant_job.passes.torch_common import require_torch, target_dtype
from kquant_job.passes.torch_state_dict import TensorCaster


def require_safetensors() -> Any:
    """The ``safetensors.torch`` module. Raises PassError(UnsupportedFormat) when missing."""
    require_torch()
    try:
        import safetensors.torch
    except ImportError as exc:
        raise PassError(
            "safetensors models need the safetensors package: install kquant[job]",
            reason=Reason.UnsupportedFormat,
        ) from exc
    return safetensors.torch


def read_safetensors(path: Path, display: str) -> tuple[dict[str, Any], dict[str, str] | None]:
    """All tensors of ``path`` (name -> CPU tensor, file order) and its metadata.

    Raises PassError(CorruptModel) when the header or data do not parse.
    """
    require_safetensors()
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata()
            return {name: fh.get_tensor(name) for name in fh.keys()}, metadata  # noqa: SIM118
    except Exception as exc:
        message = " ".join(str(exc).split())[:300]
        raise PassError(
            f"{display}: not a readable safetensors file: {message}", reason=Reason.CorruptModel
        ) from None


# What of a file's metadata header the report shows: the header is the model author's text
# (up to safetensors' 100 MB header limit), the report a page a person reads.
METADATA_ENTRIES, METADATA_CHARS = 64, 256


def report_metadata(metadata: dict[str, str] | None) -> dict[str, Any]:
    """``{"metadata": ...}`` for the report: the first METADATA_ENTRIES entries, each key and
    value cut to METADATA_CHARS characters, plus ``metadataTruncated`` (entries and bytes of
    the whole header) when anything was cut. The converted file keeps the header whole."""

    def cut(text: str) -> str:
        return text if len(text) <= METADATA_CHARS else text[: METADATA_CHARS - 3] + "..."

    metadata = metadata or {}
    shown = {cut(k): cut(v) for k, v in list(metadata.items())[:METADATA_ENTRIES]}
    out: dict[str, Any] = {"metadata": shown}
    if shown != metadata:
        size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
        out["metadataTruncated"] = {"entries": len(metadata), "bytes": size}
    return out


class SafetensorsCastPass:
    """Cast a safetensors file to FP16 or BF16, metadata kept."""

    name: ClassVar[str] = "safetensors-cast"
    formats: ClassVar[frozenset[ModelFormat]] = frozenset({ModelFormat.safetensors})

    def run(
        self, model_in: Path, config: QuantizationConfig, out_path: Path, ctx: PassContext
    ) -> PassResult:
        """Write the cast file to ``out_path``.

        Raises PassError(CorruptModel) for an unreadable file, PassError(UnsupportedFormat)
        when torch or safetensors is missing.
        """
        st = require_safetensors()
        caster = TensorCaster(target_dtype(config.precision), config.keep_fp32)
        tensors, metadata = read_safetensors(model_in, model_in.name)
        cast = {name: caster.tensor(t, name) for name, t in tensors.items()}
        # save_file refuses tensors sharing memory; safe_open gives each its own already.
        st.save_file(cast, str(out_path), metadata=metadata)
        details = {"container": "safetensors", **report_metadata(metadata), **caster.details()}
        details.pop("sharedTensors", None)
        ctx.log.info(
            "cast %d tensors of %s to %s (%d kept FP32)",
            caster.cast,
            model_in.name,
            details["dtype"],
            len(caster.kept),
        )
        return PassResult(out_path, details)
