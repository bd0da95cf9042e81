"""The attempt loop of the ONNX INT8 passes: quantize with a list of settings until a
candidate loads in onnxruntime and passes the accuracy probe, count what got quantized, and
move the chosen candidate to the output path without exposing a half-written file.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from onnx import ModelProto, TensorProto

from kquant_api import Reason
from kquant_job.errors import KquantError, PassError
from kquant_job.passes.base import PassContext, PassResult, ProbeResult
from kquant_job.passes.int8_common import Int8Settings, cpu_int8_kernels, describe_error
from kquant_job.passes.int8_recovery import Recovery, recover, score
from kquant_job.passes.int8_weight_only import count_weight_only
from kquant_job.passes.onnx_common import (
    data_file_for,
    inner_nodes,
    iter_graphs,
    iter_nodes,
    load_model,
    working_directory,
)

# Ops that onnxruntime's quantizers emit (QLinear* are matched by prefix).
QUANTIZED_OP_TYPES = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLSTM",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "QAttention",
        "QEmbedLayerNormalization",
        "MatMulNBits",  # int4 (or 2/8-bit) weight-only
        "MatMulBnb4",
        "GatherBlockQuantized",
    }
)
_INT8_TYPES = (TensorProto.INT8, TensorProto.UINT8)


def count_quantized(model: ModelProto) -> dict[str, Any]:
    """Quantized nodes in every graph (QuantizeLinear/DequantizeLinear,
    DynamicQuantizeLinear, MatMulInteger, ConvInteger, QLinear*, contrib quantized ops),
    how many of them sit inside subgraphs, per op type, the number of 8-bit integer
    initializers (quantized weights, zero points), and ``quantizedConv``: the Conv layers
    that run in INT8 (ConvInteger, QLinearConv, or a Conv whose weight comes from a
    DequantizeLinear: QDQ, fused to QLinearConv by onnxruntime), and ``weightOnlyLayers``:
    float layers whose weights are stored INT8 (:mod:`kquant_job.passes.int8_weight_only`)."""

    def quantized(op_type: str) -> bool:
        return op_type in QUANTIZED_OP_TYPES or op_type.startswith("QLinear")

    ops = Counter(n.op_type for _, n in iter_nodes(model.graph) if quantized(n.op_type))
    inside = sum(
        quantized(inner.op_type) for node in model.graph.node for inner in inner_nodes(node)
    )
    int8 = sum(t.data_type in _INT8_TYPES for g in iter_graphs(model.graph) for t in g.initializer)
    dequantized = {
        out
        for _, n in iter_nodes(model.graph)
        if n.op_type == "DequantizeLinear"
        for out in n.output
    }
    conv = sum(
        n.op_type in INTEGER_CONV_OPS
        or (n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in dequantized)
        for _, n in iter_nodes(model.graph)
    )
    return {
        "quantizedNodes": sum(ops.values()),
        "quantizedNodesInSubgraphs": inside,
        "quantizedOps": dict(sorted(ops.items())),
        "int8Initializers": int(int8),
        "quantizedConv": int(conv),
        "weightOnlyLayers": count_weight_only(model),
    }


def refuse_quantized(model: ModelProto, name: str) -> None:
    """Raise PassError(AlreadyQuantized) when ``model`` already holds quantized nodes (QDQ
    pairs, integer ops, dynamic quantization): quantizing it again would publish the same
    precision under an INT8 name, with a second rounding of its float parts."""
    counts = count_quantized(model)
    if counts["weightOnlyLayers"]:  # kquant's own weight-only INT8: the same answer
        counts["quantizedOps"]["weight-only Conv"] = counts["weightOnlyLayers"]
        counts["quantizedNodes"] += counts["weightOnlyLayers"]
    if counts["quantizedNodes"]:
        ops = ", ".join(f"{op} x{n}" for op, n in list(counts["quantizedOps"].items())[:4])
        raise PassError(
            f"{name} is already quantized ({counts['quantizedNodes']} quantized nodes: {ops}; "
            f"{counts['int8Initializers']} 8-bit initializers): INT8 again would publish "
            "the same precision under a new name. Use it as it is, or convert its float "
            "original; in a model folder, quantization.exclude keeps it as it is",
            reason=Reason.AlreadyQuantized,
            **counts,
        )


def load_error(path: Path) -> str | None:
    """None when onnxruntime (CPU) loads ``path``, else its message."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return describe_error(exc)
    return None


Quantize = Callable[[Int8Settings, Path], None]


def _produce(
    quantize: Quantize, settings: Int8Settings, candidate: Path, model_in: Path
) -> tuple[dict[str, Any] | None, str | None]:
    """Quantize into ``candidate`` and check it loads and quantized something: (its counts,
    None), or (None, why not)."""
    candidate.parent.mkdir(parents=True, exist_ok=True)
    try:
        with working_directory(candidate.parent):
            quantize(settings, candidate)
    except KquantError:
        raise
    except Exception as exc:
        return None, f"onnxruntime could not quantize {model_in.name}: {describe_error(exc)}"
    failure = load_error(candidate)
    if failure:
        return None, f"onnxruntime cannot load the quantized {model_in.name}: {failure}"
    counts = count_quantized(load_model(candidate, load_external_data=False))
    if counts["quantizedNodes"] == 0 and counts["weightOnlyLayers"] == 0:
        # The float model under an INT8 name is never a candidate.
        return None, "no node was quantized"
    return counts, None


# INT8 Conv: a candidate holding it is timed before it is chosen. ConvInteger ran OCR and
# detection models 2-8x slower than FP32 on the CPU (bench_variants.py --wheels; the CUDA
# provider has no kernel for it at all), and static QLinearConv 1.3-4.7x on the same machine.
INTEGER_CONV_OPS = frozenset({"ConvInteger", "QLinearConv"})


def run_attempts(
    pass_name: str,
    model_in: Path,
    steps: list[tuple[str, Int8Settings]],
    quantize: Quantize,
    out_path: Path,
    ctx: PassContext,
    details: dict[str, Any],
    recoverable: list[str] | None = None,
    faster: str | None = None,
    weight_only: tuple[str, ...] = (),
) -> PassResult:
    """Quantize with each step's settings until a candidate loads and passes ``ctx.probe``
    (only the first step is tried without a probe), then move it to ``out_path``.

    ``faster``: the label of a later step that leaves Conv float. A candidate within
    tolerance whose Conv layers run in INT8 (``quantizedConv``) is then timed against the
    original (the probe's ``timed``); when it counts as slower by the gain rule the ladder
    goes on at that step, and the slow candidate is returned only if no later one passes
    (validation then calls it NoGain). Measured on the PP-OCR v4 recognizer (dynamic):
    every op quantized 0.27x the size and 7.7x the latency, Conv left float 0.72x and
    0.76x.

    When every step misses the probe and ``recoverable`` (the quantizable node names, in
    graph order) is given, the nodes that break the tolerance are found and left float
    (:func:`~kquant_job.passes.int8_recovery.recover`, starting from the step whose
    candidate came closest): a last attempt ``nodeRecovery``, its ranking in
    ``details["recovery"]``.

    ``weight_only``: op types (Conv) whose weights may be stored INT8 while they compute in
    float. A passing candidate that computes them in float (no INT8 Conv) is tried once
    more with them so stored (``convWeightsInt8``) and replaced when that passes the probe
    too (on Silero VAD it does not: 0.19 max abs error on the speech probability).

    Every attempt is recorded in ``details["attempts"]`` (a timed one with ``latencyMs`` and
    ``slower``), the published one's label in ``details["chosenAttempt"]``. When a probe is
    given and no candidate passes, the last one that loaded and quantized something is
    returned with ``probePassed=False`` (validation then fails it with ValidationFailed).
    Raises PassError(ConversionFailed) naming the file and onnxruntime's message when no
    candidate was produced and loaded, or when the chosen candidate has no quantized node
    (it would be the float model renamed).
    """
    attempts: list[dict[str, Any]] = []
    chosen: tuple[Path, dict[str, Any]] | None = None
    slow: tuple[Path, dict[str, Any]] | None = None  # within tolerance, slower
    chosen_label = slow_label = ""
    passed = False
    closest: tuple[float, Int8Settings] | None = None
    todo = steps if ctx.probe else steps[:1]
    labels = [label for label, _ in todo]
    i = 0
    while i < len(todo):
        label, settings = todo[i]
        i += 1
        candidate = ctx.work_dir / f"{pass_name}-{i}" / out_path.name
        record: dict[str, Any] = {"attempt": label, **settings.describe()}
        attempts.append(record)
        counts, error = _produce(quantize, settings, candidate, model_in)
        if counts is None:
            _discard(candidate)
            record["error"] = error
            if error != "no node was quantized":
                ctx.log.warning("%s attempt %s: %s", pass_name, label, error)
            continue
        record.update(counts)
        if chosen is not None:
            _discard(chosen[0])  # one candidate on disk at a time: the last that loaded
        chosen, chosen_label = (candidate, counts), label
        if ctx.probe is None:
            break
        timed = faster in labels[i:] and counts["quantizedConv"] > 0
        # kept for validation: past the probe the pass only moves the chosen file
        result = ctx.probe(candidate, timed=True) if timed else ctx.probe(candidate, keep=True)
        record["probe"] = {"ok": result.ok, "violations": result.violations}
        if result.error:
            record["probe"]["error"] = result.error
        if result.latency is not None:
            record.update(latencyMs=result.latency, slower=result.slower)
        if result.ok and result.slower:
            ctx.log.info(
                "%s attempt %s: within tolerance, %.2fx the original's latency: trying %s",
                pass_name, label, result.latency["quantized"] / result.latency["original"],
                faster,
            )  # fmt: skip
            slow, slow_label, chosen = chosen, label, None
            i = labels.index(str(faster), i)
            continue
        if result.ok:
            passed = True
            if weight_only and settings.integer_ops and not counts["quantizedConv"]:
                stored = replace(settings, weight_only=weight_only)
                args = (pass_name, i, model_in, stored, quantize, out_path, ctx, attempts)
                better = _weights_int8(*args)
                if better is not None:
                    _discard(candidate)
                    chosen, chosen_label = better, "convWeightsInt8"
            break
        if closest is None or score(result) < closest[0]:
            closest = (score(result), settings)
    if slow is not None:
        if passed and chosen is not None:
            _discard(slow[0])
        else:  # no faster candidate passes: the accurate one, for validation to judge
            if chosen is not None:
                _discard(chosen[0])
            chosen, chosen_label, passed = slow, slow_label, True
    if ctx.probe is not None and not passed and recoverable and closest is not None:
        found = _recover(pass_name, model_in, closest[1], recoverable, quantize, out_path, ctx)
        details["recovery"] = found.describe()
        if found.settings is not None and found.path is not None:
            record = {"attempt": "nodeRecovery", **found.settings.describe(), **found.counts}
            record["probe"] = {"ok": True, "violations": []}
            attempts.append(record)
            if chosen is not None:
                _discard(chosen[0])
            chosen, chosen_label, passed = (found.path, found.counts), "nodeRecovery", True
    details["attempts"] = attempts
    details["cpuInt8Kernels"] = cpu_int8_kernels()
    if chosen is None:
        if all(a.get("error") == "no node was quantized" for a in attempts):
            why = "; ".join(details.get("warnings", [])) or (
                "no op that onnxruntime quantizes in this mode is reachable with these settings"
            )
            message = f"{pass_name}: no node of {model_in.name} was quantized ({why})"
        else:
            errors = "; ".join(f"{a['attempt']}: {a['error']}" for a in attempts)
            message = f"{pass_name}: no usable INT8 model from {model_in.name} ({errors})"
        raise PassError(message, reason=Reason.ConversionFailed, attempts=attempts)
    candidate, counts = chosen
    details.update(counts)
    details["chosenAttempt"] = chosen_label
    if ctx.probe is not None:
        details["probePassed"] = passed
    for warning in details.get("warnings", []):
        ctx.log.warning("%s: %s", pass_name, warning)
    _publish(candidate, out_path)
    return PassResult(output=out_path, details=details)


def _weights_int8(
    pass_name: str,
    i: int,
    model_in: Path,
    settings: Int8Settings,
    quantize: Quantize,
    out_path: Path,
    ctx: PassContext,
    attempts: list[dict[str, Any]],
) -> tuple[Path, dict[str, Any]] | None:
    """The passing step once more with ``settings.weight_only`` stored INT8: its candidate
    and counts when it stores a weight and passes the probe, else None (recorded in
    ``attempts`` either way)."""
    assert ctx.probe is not None
    candidate = ctx.work_dir / f"{pass_name}-{i}w" / out_path.name
    record: dict[str, Any] = {"attempt": "convWeightsInt8", **settings.describe()}
    attempts.append(record)
    counts, error = _produce(quantize, settings, candidate, model_in)
    if counts is None or not counts["weightOnlyLayers"]:
        record["error"] = error or "no weight was stored in INT8"
        _discard(candidate)
        return None
    record.update(counts)
    result = ctx.probe(candidate, keep=True)
    record["probe"] = {"ok": result.ok, "violations": result.violations}
    if not result.ok:
        _discard(candidate)
        return None
    return candidate, counts


@dataclass
class _Found:
    """A recovery and, when it passed, its candidate file and counts."""

    recovery: Recovery
    path: Path | None = None
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> Int8Settings | None:
        return self.recovery.settings

    def describe(self) -> dict[str, Any]:
        return self.recovery.describe()


def _recover(
    pass_name: str,
    model_in: Path,
    base: Int8Settings,
    nodes: list[str],
    quantize: Quantize,
    out_path: Path,
    ctx: PassContext,
) -> _Found:
    """Run :func:`recover` with candidates under the work directory; the passing one's file."""
    assert ctx.probe is not None
    probe = ctx.probe
    made: dict[Int8Settings, tuple[Path, dict[str, Any]]] = {}

    def try_(settings: Int8Settings, label: str) -> ProbeResult | None:
        candidate = ctx.work_dir / f"{pass_name}-recovery" / label / out_path.name
        counts, _ = _produce(quantize, settings, candidate, model_in)
        if counts is None:
            _discard(candidate)
            return None
        result = probe(candidate)
        # Only a passing candidate with every group but the float ones can be chosen; the
        # ranking's one-group candidates and failing ones leave the disk at once.
        if settings.nodes_to_quantize or not result.ok:
            _discard(candidate)
        else:  # bisection passes with ever fewer float groups: the newest passing is best
            for path, _ in made.values():
                _discard(path)
            made.clear()
            made[settings] = (candidate, counts)
        return result

    ctx.log.info("%s: every fallback missed the tolerance; ranking nodes", pass_name)
    found = _Found(recover(base, nodes, try_))
    if found.settings is not None:
        key = replace(found.settings, nodes_to_quantize=())
        if key not in made:  # not the newest passing one after all: make it again
            candidate = ctx.work_dir / f"{pass_name}-recovery" / "chosen" / out_path.name
            counts, _ = _produce(quantize, key, candidate, model_in)
            made[key] = (candidate, counts or {})
        found.path, found.counts = made.pop(key)
    for path, _ in made.values():
        _discard(path)
    if found.settings is not None:
        ctx.log.info(
            "%s: %d node(s) left float pass the tolerance (%d probes)",
            pass_name,
            len(found.recovery.kept_float),
            found.recovery.probes,
        )
    return found


def _discard(candidate: Path) -> None:
    """Remove a candidate's folder (the model, its data file, onnxruntime's temporary files):
    a ladder of 100 MiB candidates kept them all, 36x the source on disk (bench_workdir,
    static INT8 with node recovery) against a budget of 5x."""
    shutil.rmtree(candidate.parent, ignore_errors=True)


def _publish(candidate: Path, out_path: Path) -> None:
    """Move the candidate (its data file first, the model last) to ``out_path``, each file
    under a temporary name then renamed, so no half-written file appears there. A stale
    data file at the destination is removed when the candidate has none."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in ((data_file_for(candidate), data_file_for(out_path)), (candidate, out_path)):
        if not src.exists():
            dst.unlink(missing_ok=True)
            continue
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.move(str(src), str(tmp))
        os.replace(tmp, dst)
