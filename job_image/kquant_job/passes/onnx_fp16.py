"""ONNX FP16 pass: onnxruntime's converter plus a repair ladder, so that what comes out
loads in onnxruntime and, when a probe is given, stays within the validation tolerance.

Steps (each one converts the original again with larger block lists and checks the
candidate: onnxruntime loads it on CPU, then ``ctx.probe`` if given):

0. values FP16 cannot hold are found before the first conversion (onnx_fp16_ranges):
   FP32 weights with ``|x| > 65504``, inf or nan, which both common converters would clamp
   to 65504 without a word, and, when ``ctx.activation_ranges`` is given, activations
   measured beyond half the FP16 range on the validation samples; the nodes producing and
   reading them are kept FP32;
1. load errors: the node named in onnxruntime's message is kept FP32;
2. tolerance violations (or NaN/Inf): groups of numerically fragile op types, one group
   at a time;
3. bisection over the nodes still converted, the way automatic mixed precision searches:
   halves are kept FP32 until the smallest set that must stay FP32 is known.

Attempts and time are bounded; what was tried goes into ``details`` and, on failure, into
the ``PassError(ConversionFailed)`` message. If the bisection runs out of budget, the last
configuration that passed is kept (more nodes FP32 than needed, never a broken model).

The CPU load check finds load errors only: onnxruntime's CPU provider runs most FP16 ops
in FP32 between Casts it inserts (and drops the Cast pairs between them), so an FP16
overflow that CUDA kernels produce does not show there. Numeric checks come from
``ctx.probe``, which runs on the job's GPU when there is one, and overflow of measured
activations from step 0, which holds on any provider.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import onnx
from onnx import ModelProto
from onnxruntime.transformers import float16 as ort_float16

from kquant_api import ModelFormat, Precision, QuantizationConfig, Reason
from kquant_job.errors import PassError
from kquant_job.passes.base import PassContext, PassResult
from kquant_job.passes.onnx_common import (
    iter_nodes,
    iter_tensors,
    load_model,
    name_unnamed_nodes,
    save_model,
)
from kquant_job.passes.onnx_fp16_ladder import Ladder, LadderFailed
from kquant_job.passes.onnx_fp16_ranges import scan_activations, scan_kept, scan_out_of_range
from kquant_job.passes.onnx_refusals import refuse

LOG = logging.getLogger("kquant.pass")

# onnxruntime's list plus the ops kquant keeps FP32: traditional-ML ops without FP16
# kernels, ops whose FP16 results differ (Resize coordinates, Range/CumSum accumulation),
# and random generators.
DEFAULT_OP_BLOCK_LIST: tuple[str, ...] = tuple(
    sorted(
        set(ort_float16.DEFAULT_OP_BLOCK_LIST)
        | {
            "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "CumSum",
            "DictVectorizer", "FeatureVectorizer", "Imputer", "LabelEncoder",
            "LinearClassifier", "LinearRegressor", "Max", "Min", "NonMaxSuppression",
            "Normalizer", "OneHotEncoder", "RandomNormalLike", "RandomUniformLike", "Range",
            "Resize", "RoiAlign", "SVMClassifier", "SVMRegressor", "Scaler", "TopK",
            "TreeEnsembleClassifier", "TreeEnsembleRegressor", "Upsample", "ZipMap",
        }
    )
)  # fmt: skip
CONVERTER = "onnxruntime.transformers.float16"
MAX_ATTEMPTS = 24
MAX_SECONDS = 3600.0
SPILL_BYTES = 64 * 2**20  # embedded weights beyond this go to a scratch data file


class OnnxFp16Pass:
    """FP16 weights and activations for ONNX models (onnxruntime's converter, repaired)."""

    name: ClassVar[str] = "onnx-fp16"
    formats: ClassVar[frozenset[ModelFormat]] = frozenset({ModelFormat.onnx})

    def __init__(self, max_attempts: int = MAX_ATTEMPTS, max_seconds: float = MAX_SECONDS):
        self.max_attempts = max_attempts
        self.max_seconds = max_seconds

    def run(
        self, model_in: Path, config: QuantizationConfig, out_path: Path, ctx: PassContext
    ) -> PassResult:
        """Convert ``model_in`` to FP16 into ``out_path`` (plus ``<name>.data`` beside it when
        the result reaches 2 GiB).

        Raises PassError(CorruptModel) when ``model_in`` is not an ONNX model, and
        PassError(ConversionFailed) when no candidate loads (or, with a probe, passes)
        within the attempt and time bounds; the message lists what was tried.
        """
        keep_io = config.keepIoTypes is not False
        repair = config.repair is not False and not config.strict
        listed = set(config.opBlockList or [])
        ops = listed if config.replaceOpBlockList else set(DEFAULT_OP_BLOCK_LIST) | listed
        nodes = set(config.nodeBlockList or [])

        scratch = ctx.work_dir / "onnx-fp16"
        base, base_dir, named, out_of_range, range_nodes = _prepare(model_in, scratch)
        refuse(base, model_in.name, Precision.fp16)
        nodes |= range_nodes
        # Spilled weights: the ranges are measured on that copy (a session reads its data
        # file; an embedded model would be held three times: proto, bytes, session).
        spilled = base_dir / "model.onnx" if base_dir != model_in.parent else None
        fp32_activations, activation_nodes, measured = _activation_block(base, ctx, spilled)
        nodes |= activation_nodes
        # ONNX honours keepFp32 only when set: its default names PyTorch statistics, and an
        # FP32 BatchNormalization between FP16 convolutions would stop Conv+BN fusion.
        kept, kept_nodes = scan_kept(base, config.keepFp32) if config.keepFp32 else ({}, set())
        nodes |= kept_nodes
        unknown = sorted(
            set(config.nodeBlockList or []) - {n.name for _, n in iter_nodes(base.graph)}
        )
        if unknown:
            LOG.warning("fp16: nodeBlockList names no node", extra={"fields": {"nodes": unknown}})
        ladder = Ladder(
            base=base,
            base_dir=base_dir,
            keep_io_types=keep_io,
            probe=ctx.probe if repair else None,
            scratch=scratch,
            file_name=out_path.name,
            max_attempts=self.max_attempts if repair else 1,
            max_seconds=self.max_seconds,
            original=model_in,
        )
        try:
            found = ladder.run(ops, nodes, repair=repair)
        except LadderFailed as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            raise PassError(
                f"{model_in.name}: FP16 conversion failed: {exc.message}",
                reason=Reason.ConversionFailed,
                attempts=ladder.attempts,
            ) from None
        if not found.fp16:
            shutil.rmtree(scratch, ignore_errors=True)
            # The FP32 model under an FP16 name would be a lie (as for INT8): fail, say why.
            raise PassError(
                f"{model_in.name}: nothing was converted to FP16: every op is kept FP32 by "
                f"opBlockList/nodeBlockList (op types: {', '.join(_op_types(base)) or 'none'})",
                reason=Reason.ConversionFailed,
                attempts=ladder.attempts,
            )
        files = _publish(found.files, out_path)
        shutil.rmtree(scratch, ignore_errors=True)

        details: dict[str, Any] = {
            "converter": CONVERTER,
            "keepIoTypes": keep_io,
            "opBlockList": sorted(found.ops),
            "nodeBlockList": sorted(found.nodes),
            "fp32Initializers": dict(sorted(out_of_range.items())),
            "fp32Activations": fp32_activations,
            "keepFp32": kept,
            "activationRanges": measured,
            "repaired": len(ladder.attempts) > 1,
            "attempts": ladder.attempts,
            "namedNodes": named,
            "files": [f.name for f in files],
        }
        if unknown:
            details["unknownNodeBlockList"] = unknown
        return PassResult(output=out_path, details=details)


def _prepare(
    model_in: Path, scratch: Path
) -> tuple[ModelProto, Path, int, dict[str, float | str], set[str]]:
    """Load the model without its external data, name its nodes, find out-of-range tensors,
    park large embedded weights in a scratch data file (each attempt copies the base: this
    way memory holds one copy of the weights, not two) and run shape inference (the
    converter needs tensor types to cast around blocked nodes).

    Returns (base, folder of its external data, nodes named, out-of-range tensors, nodes
    to keep FP32 for them).
    """
    LOG.info("fp16: loading", extra={"fields": {"model": model_in.name}})
    base = load_model(model_in, load_external_data=False)
    named = name_unnamed_nodes(base)
    LOG.info("fp16: scanning initializers for values beyond FP16")
    out_of_range, range_nodes = scan_out_of_range(base, model_in.parent)
    if out_of_range:
        LOG.info(
            "fp16: keeping out-of-range tensors FP32",
            extra={"fields": {"tensors": sorted(out_of_range), "nodes": sorted(range_nodes)}},
        )
    base_dir = model_in.parent
    if base.ByteSize() > SPILL_BYTES and not any(_external(base)):
        LOG.info("fp16: moving embedded weights to a scratch data file")
        save_model(base, scratch / "base" / "model.onnx", size_limit=0)
        base_dir = scratch / "base"
    try:
        base = onnx.shape_inference.infer_shapes(base)
    except Exception as exc:  # inference is a help, not a requirement
        LOG.warning("fp16: shape inference failed", extra={"fields": {"error": str(exc)}})
    return base, base_dir, named, out_of_range, range_nodes


def _activation_block(
    base: ModelProto, ctx: PassContext, copy: Path | None = None
) -> tuple[dict[str, float], set[str], str]:
    """Activations beyond the FP16 headroom and the nodes to keep FP32 for them (step 0),
    and what happened: ``measured``, ``not measured`` (no ranges in ``ctx``: validation off)
    or ``failed: <error>`` (then the ladder's probe is the only check). ``copy``: the
    original with its weights in a data file, measured instead of the original."""
    if ctx.activation_ranges is None:
        return {}, set(), "not measured"
    LOG.info("fp16: measuring activation ranges on the validation samples")
    try:
        ranges = ctx.activation_ranges(copy) if copy else ctx.activation_ranges()
    except Exception as exc:
        LOG.warning("fp16: activation ranges not measured", extra={"fields": {"error": str(exc)}})
        return {}, set(), f"failed: {' '.join(str(exc).split())[:300]}"
    found, block = scan_activations(base, ranges)
    if found:
        LOG.info(
            "fp16: keeping activations beyond the FP16 range FP32",
            extra={"fields": {"values": sorted(found), "nodes": sorted(block)}},
        )
    return found, block, "measured"


def _external(model: ModelProto) -> Iterator[bool]:
    from onnx.external_data_helper import uses_external_data

    return (uses_external_data(t) for t in iter_tensors(model))


def _op_types(model: ModelProto) -> list[str]:
    return sorted({node.op_type for _, node in iter_nodes(model.graph)})


def _publish(files: list[Path], out_path: Path) -> list[Path]:
    """Move a candidate's files next to ``out_path``: data file first, model file last, each
    through a temporary name and an atomic rename."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    placed = []
    for src in sorted(files, key=lambda f: f.name == out_path.name):
        dst = out_path.with_name(src.name)
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.move(src, tmp)
        tmp.replace(dst)
        placed.append(dst)
    return sorted(placed, key=lambda f: f.name != out_path.name)
