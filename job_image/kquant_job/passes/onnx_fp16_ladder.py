"""The FP16 repair ladder: convert, check, widen the block lists, retry (see onnx_fp16)."""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnx import ModelProto, TensorProto

from kquant_job.passes.base import Probe
from kquant_job.passes.onnx_common import CONTROL_FLOW_OPS, iter_graphs, iter_nodes
from kquant_job.passes.onnx_external import save_streaming
from kquant_job.passes.onnx_fp16_convert import convert, converter_block_lists, ort_load_error

LOG = logging.getLogger("kquant.pass")

# Op types whose FP16 results most often overflow or lose too much precision, most likely
# first: powers/roots/divisions (x**2 of activations beyond 255 is inf in FP16), then
# reductions, normalizations and exponentials, then recurrent cells.
FRAGILE_OP_GROUPS: tuple[tuple[str, ...], ...] = (
    ("Div", "Pow", "Reciprocal", "Sqrt"),
    (
        "Exp", "LayerNormalization", "Log", "LogSoftmax", "ReduceL2", "ReduceLogSumExp",
        "ReduceMean", "ReduceProd", "ReduceSum", "ReduceSumSquare",
        "SimplifiedLayerNormalization", "Softmax",
    ),
    (
        "BatchNormalization", "GroupNormalization", "InstanceNormalization",
        "LpNormalization", "MeanVarianceNormalization",
    ),
    ("GRU", "LSTM", "RNN"),
)  # fmt: skip

_NODE_RES = [
    re.compile(p)
    for p in (
        r"of node \(([^)]*)\)",
        r"in node \(([^)]*)\)",
        r"node with name '([^']*)'",
        r"same node name \(([^)]*)\)",
        r"node\. Name:'([^']*)'",  # run-time errors: "... while running Pow node. Name:'x'"
    )
]
_CONTROL_FLOW_RE = re.compile(r"Node \(([^)]*)\) Op \(")
_TENSOR_RES = [
    re.compile(p)
    for p in (
        r"Node input '([^']*)'",
        r"Graph output \(([^)]*)\)",
        r"output arg \(([^)]*)\)",
        r"input arg \(([^)]*)\)",
    )
]
# Names the converter gives its Casts, and prefixes onnxruntime adds when it inlines If
# branches (constant condition) or model-local functions.
_CAST_SUFFIX_RE = re.compile(r"_cast_to_fp(16|32)(_node)?$")
_FUNCTION_RE = re.compile(r"^F\d+::")
_INLINE_RE = re.compile(r"^.*?__Inline_\d+__")


class LadderFailed(Exception):
    """No candidate passed; ``message`` says what was tried and the last error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Found:
    """The block lists of the candidate that passed, its files, and whether some op of it
    computes in FP16 (:func:`computes_in_fp16`, read from the converted graph before it was
    saved: the check of the file it wrote held a second copy of its weights)."""

    ops: set[str]
    nodes: set[str]
    files: list[Path]
    fp16: bool = True


def computes_in_fp16(model: ModelProto) -> bool:
    """True when ``model`` holds an FP16 tensor or casts a value to FP16 (in any graph),
    i.e. when some op now computes in FP16."""
    for graph in iter_graphs(model.graph):
        if any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer):
            return True
    for _, node in iter_nodes(model.graph):
        if node.op_type == "Cast" and any(
            a.name == "to" and a.i == TensorProto.FLOAT16 for a in node.attribute
        ):
            return True
        if node.op_type == "Constant" and any(
            a.HasField("t") and a.t.data_type == TensorProto.FLOAT16 for a in node.attribute
        ):
            return True
    return False


@dataclass
class _Outcome:
    kind: str  # "ok", "load" (does not load or run), "tolerance" or "converter"
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


@dataclass
class Ladder:
    """Converts ``base`` with growing block lists until a candidate passes; each attempt
    is recorded in ``attempts`` as ``{step, added, outcome}``."""

    base: ModelProto
    base_dir: Path
    keep_io_types: bool
    probe: Probe | None
    scratch: Path
    file_name: str
    max_attempts: int
    max_seconds: float
    original: Path | None = None  # checked once when the first candidate does not load
    attempts: list[dict[str, Any]] = field(default_factory=list)
    _latest: tuple[frozenset[str], frozenset[str], list[Path], bool] | None = None
    _started: float = 0.0

    def run(self, ops: set[str], nodes: set[str], *, repair: bool) -> Found:
        """The first passing candidate along the ladder. Raises LadderFailed."""
        self._started = time.monotonic()
        ops, nodes = set(ops), set(nodes)
        outcome = self._try("convert", [], ops, nodes)
        if outcome.kind == "load" and self.original and (error := ort_load_error(self.original)):
            raise LadderFailed(f"the original model does not load in onnxruntime: {error[:400]}")
        present = {node.op_type for _, node in iter_nodes(self.base.graph)}
        groups = [tuple(sorted(set(g) & present)) for g in FRAGILE_OP_GROUPS]
        load_steps = 0
        while not outcome.ok:
            if not repair or self._exhausted():
                why = "repair is off" if not repair else "attempt or time budget spent"
                raise LadderFailed(f"{why}; {self._summary(outcome)}")
            if outcome.kind == "load" and load_steps < max(1, self.max_attempts // 3):
                target = culprit(outcome.message, self.base, ops, nodes)
                if target:
                    load_steps += 1
                    nodes.add(target)
                    outcome = self._try("load-error", [f"node:{target}"], ops, nodes)
                    continue
            if outcome.kind == "tolerance":
                group = next((g for g in groups if g and not set(g) <= ops), None)
                if group:
                    added = sorted(set(group) - ops)
                    ops |= set(group)
                    outcome = self._try("fragile-ops", [f"op:{o}" for o in added], ops, nodes)
                    continue
            return self._bisect(ops, nodes, outcome)
        return self._found(ops, nodes)

    def _bisect(self, ops: set[str], nodes: set[str], last: _Outcome) -> Found:
        _, blocked = converter_block_lists(self.base, ops, nodes)
        candidates = list(
            dict.fromkeys(
                node.name
                for _, node in iter_nodes(self.base.graph)
                if node.op_type not in ops
                and node.op_type not in CONTROL_FLOW_OPS
                and node.name not in blocked
            )
        )
        if not candidates or self._exhausted():
            raise LadderFailed(f"no budget or nodes left to bisect; {self._summary(last)}")
        every = self._try("bisect", _names(candidates), ops, nodes | set(candidates))
        if not every.ok:
            raise LadderFailed(f"fails even with every node FP32; {self._summary(every)}")
        keep = self._find(ops, nodes, candidates)
        return self._found(ops, nodes | set(keep))

    def _find(self, ops: set[str], fixed: set[str], cands: list[str]) -> list[str]:
        """A subset S of ``cands`` such that blocking ``fixed`` plus S passed a check, given
        that ``fixed`` plus all of ``cands`` did; small when the budget allows."""
        if len(cands) <= 1 or self._exhausted():
            return cands
        first, second = cands[: len(cands) // 2], cands[len(cands) // 2 :]
        if self._try("bisect", _names(second), ops, fixed | set(second)).ok:
            return self._find(ops, fixed, second)
        if self._exhausted():
            return cands
        if self._try("bisect", _names(first), ops, fixed | set(first)).ok:
            return self._find(ops, fixed, first)
        keep_first = self._find(ops, fixed | set(second), first)
        return keep_first + self._find(ops, fixed | set(keep_first), second)

    def _found(self, ops: set[str], nodes: set[str]) -> Found:
        if self._latest and self._latest[:2] == (frozenset(ops), frozenset(nodes)):
            return Found(ops, nodes, self._latest[2], self._latest[3])
        # the passing candidate for this configuration was replaced by a later one
        outcome = self._try("final", [], ops, nodes)
        if not outcome.ok or self._latest is None:
            raise LadderFailed(f"final candidate failed; {self._summary(outcome)}")
        return Found(ops, nodes, self._latest[2], self._latest[3])

    def _try(self, step: str, added: list[str], ops: set[str], nodes: set[str]) -> _Outcome:
        index = len(self.attempts)
        folder = self.scratch / f"attempt-{index:02d}"
        shutil.rmtree(folder, ignore_errors=True)
        LOG.info("fp16: converting", extra={"fields": {"attempt": index, "step": step}})
        try:
            model = convert(self.base, keep_io_types=self.keep_io_types, ops=ops, nodes=nodes)
            fp16 = computes_in_fp16(model)
            files = save_streaming(model, folder / self.file_name, self.base_dir)
            del model
        except Exception as exc:  # a converter bug: more blocking will not help
            shutil.rmtree(folder, ignore_errors=True)
            failed = _Outcome("converter", f"{type(exc).__name__}: {exc}")
            self.attempts.append({"step": step, "added": added, "outcome": _short(failed)})
            raise LadderFailed(f"the converter raised; {self._summary(failed)}") from exc
        outcome = self._check(files[0])
        brief = "ok" if outcome.ok else _short(outcome)
        LOG.info("fp16: checked", extra={"fields": {"attempt": index, "outcome": brief[:200]}})
        self.attempts.append({"step": step, "added": added, "outcome": brief})
        if outcome.ok:
            if self._latest:
                shutil.rmtree(self._latest[2][0].parent, ignore_errors=True)
            self._latest = (frozenset(ops), frozenset(nodes), files, fp16)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        return outcome

    def _check(self, path: Path) -> _Outcome:
        if self.probe is None:
            error = ort_load_error(path)
            return _Outcome("load", error) if error else _Outcome("ok")
        # The probe creates a session itself and reports a failed load as such: a separate
        # load check first would build the candidate's session twice (0.7 s on BERT-base).
        # Not kept for validation: held from here, the FP16 session (with the FP32 copies
        # the CPU provider makes of its weights) took the job's peak from 1.9x the model's
        # bytes to 2.2x (BERT-base, bench_job).
        result = self.probe(path)
        if result.ok:
            return _Outcome("ok")
        if result.error:
            return _Outcome("load", result.error)
        return _Outcome("tolerance", "; ".join(result.violations) or "tolerance exceeded")

    def _exhausted(self) -> bool:
        spent = time.monotonic() - self._started
        return len(self.attempts) >= self.max_attempts or spent > self.max_seconds

    def _summary(self, last: _Outcome) -> str:
        tried = ", ".join(
            f"{a['step']}({_brief(a['added'])}): {'ok' if a['outcome'] == 'ok' else 'failed'}"
            for a in self.attempts
        )
        return f"{len(self.attempts)} attempts [{tried}]; last error: {_short(last)}"


def culprit(message: str, base: ModelProto, ops: set[str], nodes: set[str]) -> str | None:
    """The node to keep FP32 next for an onnxruntime load error, or None.

    Looks for node names first (innermost first: "... of node (Y)" inside "Node (If_0) Op
    (If) ..."), then for tensor names, whose producer or consumers are taken. Names of the
    converter's Casts and of If branches inlined by onnxruntime are mapped back to the
    original graph. Only nodes that are still converted qualify.
    """
    conv_ops, conv_nodes = converter_block_lists(base, ops, nodes)
    by_name = {node.name: node for _, node in iter_nodes(base.graph)}
    producer: dict[str, str] = {}
    consumers: dict[str, list[str]] = {}
    for _, node in iter_nodes(base.graph):
        for out in node.output:
            producer.setdefault(out, node.name)
        for inp in node.input:
            consumers.setdefault(inp, []).append(node.name)

    def converted(name: str) -> bool:
        node = by_name.get(name)
        if node is None:
            return False
        if node.op_type in CONTROL_FLOW_OPS:
            return node.name not in nodes and node.op_type not in ops
        return node.op_type not in conv_ops and node.name not in conv_nodes

    names = [m for rx in _NODE_RES for m in reversed(rx.findall(message))]
    names += _CONTROL_FLOW_RE.findall(message)
    tensors = []
    for raw in names:
        for name in _variants(raw):
            if converted(name):
                return name
            if name not in by_name:
                tensors.append(_CAST_SUFFIX_RE.sub("", name))
    for rx in _TENSOR_RES:
        tensors += [_CAST_SUFFIX_RE.sub("", v) for t in rx.findall(message) for v in _variants(t)]
    for tensor in tensors:
        for name in [producer.get(tensor, ""), *consumers.get(tensor, [])]:
            if converted(name):
                return name
    return None


def _variants(name: str) -> list[str]:
    """``name`` and what it was before onnxruntime prefixed it: "F0::" for model-local
    functions, "<If node>_then_branch__Inline_0__" (per level) for inlined If branches."""
    out = [name]
    name = _FUNCTION_RE.sub("", name)
    while True:
        out.append(name)
        shorter = _INLINE_RE.sub("", name, count=1)
        if shorter == name:
            return list(dict.fromkeys(out))
        name = shorter


def _names(names: list[str]) -> list[str]:
    shown = [f"node:{n}" for n in names[:20]]
    return shown + ([f"... +{len(names) - 20} more"] if len(names) > 20 else [])


def _brief(added: list[str]) -> str:
    return ", ".join(added[:3]) + (", ..." if len(added) > 3 else "")


def _short(outcome: _Outcome) -> str:
    text = " ".join(outcome.message.split())
    return f"{outcome.kind}: {text[:400]}"
