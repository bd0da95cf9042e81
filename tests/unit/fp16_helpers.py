"""Helpers shared by the FP16 pass tests: onnxruntime sessions, Silero feeds, a probe,
small graph builders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from kquant_api import QuantizationConfig
from kquant_job.passes import PassContext, ProbeResult
from kquant_job.passes.onnx_common import iter_graphs
from kquant_job.passes.onnx_fp16 import OnnxFp16Pass

FP16 = QuantizationConfig(precision="fp16")
OPTS = ort.SessionOptions()
OPTS.log_severity_level = 3


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), OPTS, providers=["CPUExecutionProvider"])


def silero_feeds(path: Path, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Audio-like noise (x0.1) of the model's window (512, or 576 for fixed-width variants),
    zero state, sr=16000."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session(path).get_inputs():
        if inp.name == "sr":
            feeds["sr"] = np.array(16000, np.int64)
        elif inp.name == "input":
            width = 576 if inp.shape[1] == 576 else 512
            feeds["input"] = (rng.standard_normal((batch, width)) * 0.1).astype(np.float32)
        else:  # state (2, batch, 128) or h/c (1, 1, 128)
            shape = [d if isinstance(d, int) else batch for d in inp.shape]
            feeds[inp.name] = np.zeros(shape, np.float32)
    return feeds


def run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = session(path)
    wanted = {i.name: i.type for i in sess.get_inputs()}
    with np.errstate(over="ignore"):  # FP16 inputs may overflow on purpose
        cast = {
            k: v.astype(np.float16) if wanted[k] == "tensor(float16)" else v
            for k, v in feeds.items()
        }
    return [np.asarray(o, np.float32) for o in sess.run(None, cast)]


def rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    """max |ref - got| relative to max(1, max |ref|); inf when got is not finite."""
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(ref - got).max() / max(1.0, float(np.abs(ref).max())))


def make_probe(original: Path, feeds: dict[str, np.ndarray], tol: float = 1e-2, fp16=False):
    """A probe like the validation module's: load/run errors, then a relative tolerance.

    With ``fp16=True`` the candidate runs in onnx's reference evaluator, which computes each
    op in its declared type like CUDA kernels do; onnxruntime's CPU provider runs most FP16
    ops in FP32 between inserted Casts (and drops Cast pairs), hiding FP16 overflows.
    """
    reference = run(original, feeds)

    def probe(candidate: Path, **_: object) -> ProbeResult:
        try:
            if fp16:
                evaluator = ReferenceEvaluator(str(candidate))
                with np.errstate(over="ignore", invalid="ignore"):  # inf is what we look for
                    outputs = [np.asarray(o, np.float32) for o in evaluator.run(None, feeds)]
            else:
                outputs = run(candidate, feeds)
        except Exception as exc:
            return ProbeResult(ok=False, error=str(exc))
        bad = [f"out{i}: {e:.3g}" for i, (r, o) in enumerate(zip(reference, outputs, strict=True))
               if (e := rel_error(r, o)) > tol]  # fmt: skip
        return ProbeResult(ok=not bad, violations=bad)

    return probe


def convert(model: Path, tmp_path: Path, config=FP16, probe=None, **kw):
    out = tmp_path / "out" / "model.onnx"
    ctx = PassContext(work_dir=tmp_path / "work", probe=probe)
    return OnnxFp16Pass(**kw).run(model, config, out, ctx)


def save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tensors_of(model: onnx.ModelProto, dtype: int) -> set[str]:
    """Names of the initializers and Constant outputs of ``dtype`` in every graph."""
    names = set()
    for graph in iter_graphs(model.graph):
        names |= {i.name for i in graph.initializer if i.data_type == dtype}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute[0].t.data_type == dtype:
                names.add(node.output[0])
    return names


def fp32_tensors(model: onnx.ModelProto) -> set[str]:
    return tensors_of(model, TensorProto.FLOAT)


def batchnorm_model(path: Path) -> Path:
    """y = BatchNorm(x; var = [1e7, 4e6, 1]) * w: the variance does not fit in FP16."""
    inits = [
        numpy_helper.from_array(np.ones(3, np.float32), "scale"),
        numpy_helper.from_array(np.zeros(3, np.float32), "bias"),
        numpy_helper.from_array(np.zeros(3, np.float32), "mean"),
        numpy_helper.from_array(np.array([1e7, 4e6, 1.0], np.float32), "var"),
        numpy_helper.from_array(np.full((1, 3, 1, 1), 2.0, np.float32), "w"),
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["bn"],
                         name="bn"),
        helper.make_node("Mul", ["bn", "w"], ["y"], name="mul"),
    ]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    return save(helper.make_graph(nodes, "bn", [x], [y], inits), path)


def overflow_model(path: Path) -> Path:
    """y = sqrt(mean((x * 1000) ** 2)): the squares reach 1e7, inf in FP16."""
    inits = [numpy_helper.from_array(np.array(1e3, np.float32), "k"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]  # fmt: skip
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["scaled"], name="scale"),
        helper.make_node("Pow", ["scaled", "two"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[1], name="mean"),
        helper.make_node("Sqrt", ["ms"], ["y"], name="root"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1])
    return save(helper.make_graph(nodes, "overflow", [x], [y], inits), path)


def celu_model(path: Path) -> Path:
    """Celu has no FP16 type in the ONNX schema: its FP16 version does not load."""
    inits = [numpy_helper.from_array(np.full((1, 8), 0.5, np.float32), "w")]
    nodes = [helper.make_node("Mul", ["x", "w"], ["m"], name="mul"),
             helper.make_node("Celu", ["m"], ["y"], name="celu")]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    return save(helper.make_graph(nodes, "celu", [x], [y], inits), path)
