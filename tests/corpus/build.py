"""Build the corpus models into a folder (once per process) and their validation specs.

Exports use the TorchScript-based exporter (``dynamo=False``): the dynamo exporter needs
onnxscript, which is not installed. Each model is exported from a seeded module, so the
files are the same in every run.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from corpus import torch_archs as archs
from kquant_api import ValidationConfig
from kquant_job.validate.inputs import generate_feeds, numpy_dtype


@dataclass(frozen=True)
class CorpusModel:
    """One corpus model: its file and how to feed it (generated inputs, kquant's rules)."""

    name: str
    path: Path
    origin: str  # "torch.onnx.export", "onnx.helper" or "<package>" it ships in
    validation: dict[str, Any] = field(default_factory=dict)  # spec.validation overrides

    def config(self, samples: int = 4, seed: int = 0) -> ValidationConfig:
        """spec.validation for this model: ``samples`` generated feeds from ``seed``."""
        return ValidationConfig.model_validate(
            {"samples": samples, "seed": seed, **self.validation}
        )


def feeds_for(model: CorpusModel, samples: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Generated feeds of the corpus tables: seeded normal(0, 0.5) floats and small ints on
    the shapes the model's validation overrides give (the generic generator, not the
    worker's input discovery, so the recorded outcomes stay tied to these exact inputs)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    signature = [(i.name, i.shape, numpy_dtype(i.type)) for i in session.get_inputs()]
    return generate_feeds(signature, model.config(samples, seed))


def _export(module: torch.nn.Module, args: tuple, path: Path, names: tuple[list, list],
            opset: int = 17) -> Path:  # fmt: skip
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=opset,
            input_names=names[0], output_names=names[1],
        )  # fmt: skip
    return path


def _seeded(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return factory()


def _speech(path: Path) -> Path:
    model = _seeded(archs.SpeechEncoder)
    return _export(model, (torch.zeros(1, 800),), path, (["audio"], ["logits"]))


def _whisper(path: Path) -> Path:
    model = _seeded(archs.WhisperTiny)
    args = (torch.zeros(1, 16, 20), torch.zeros(1, 4, dtype=torch.long))
    return _export(model, args, path, (["mel", "tokens"], ["logits"]))


def _bert(path: Path) -> Path:
    model = _seeded(archs.BertTiny)
    ids = torch.zeros(1, 8, dtype=torch.long)
    return _export(model, (ids, ids), path, (["input_ids", "attention_mask"], ["hidden", "pooled"]))


def _cnn(path: Path) -> Path:
    model = _seeded(archs.UpsampleCNN)
    with torch.no_grad():  # trained-looking statistics; the input norm sees raw values
        for bn in (model.b1, model.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        model.in_norm.running_var.copy_(torch.tensor([1e7, 4e6, 1.0]))
    return _export(model, (torch.zeros(1, 3, 16, 16),), path, (["image"], ["mask"]))


def _rnn(path: Path) -> Path:
    model = _seeded(archs.RecurrentNet)
    return _export(model, (torch.zeros(1, 10, 16),), path, (["x"], ["y"]))


def _loud_layernorm(path: Path) -> Path:
    model = _seeded(archs.LoudLayerNorm)
    return _export(model, (torch.zeros(2, 16),), path, (["x"], ["logits"]), opset=14)


def _control_flow(path: Path) -> Path:
    """x (4, 8) -> Loop 3 times h = tanh(h W + b) -> If sum(h) > 0: h W2 else relu(h)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 8)) * 0.4).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b"),
        numpy_helper.from_array((rng.standard_normal((8, 8)) * 0.4).astype(np.float32), "W2"),
        numpy_helper.from_array(np.array(3, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "go"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    f32 = TensorProto.FLOAT
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "W"], ["hw"], name="loop_mm"),
            helper.make_node("Add", ["hw", "b"], ["hb"], name="loop_add"),
            helper.make_node("Tanh", ["hb"], ["h_out"], name="loop_tanh"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond"),
        ],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", f32, [4, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", f32, [4, 8])],
    )  # fmt: skip
    then = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W2"], ["t"], name="then_mm")],
        "then", [], [helper.make_tensor_value_info("t", f32, [4, 8])],
    )  # fmt: skip
    other = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["e"], name="else_relu")],
        "else", [], [helper.make_tensor_value_info("e", f32, [4, 8])],
    )  # fmt: skip
    nodes = [
        helper.make_node("Loop", ["trips", "go", "x"], ["h"], body=body, name="loop"),
        helper.make_node("ReduceSum", ["h"], ["total"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="greater"),
        helper.make_node("If", ["positive"], ["y"], then_branch=then, else_branch=other,
                         name="branch"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "control_flow",
        [helper.make_tensor_value_info("x", f32, [4, 8])],
        [helper.make_tensor_value_info("y", f32, [4, 8])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


_BUILT: dict[str, tuple[Callable[[Path], Path], dict[str, Any]]] = {
    "speech_encoder": (_speech, {}),
    "whisper_tiny": (_whisper, {"inputs": {"tokens": {"low": 0, "high": 50}}}),
    "bert_tiny": (_bert, {"inputs": {"input_ids": {"low": 0, "high": 64},
                                     "attention_mask": {"low": 0, "high": 2}}}),
    "cnn_upsample": (_cnn, {}),
    "lstm_gru": (_rnn, {}),
    "control_flow": (_control_flow, {}),
    "loud_layernorm": (_loud_layernorm, {}),
}  # fmt: skip
_SHIPPED: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (package, file inside it, validation overrides)
    "silero_vad": ("silero_vad", "data/silero_vad.onnx",
                   {"inputs": {"input": {"shape": [1, 512]}, "sr": {"value": 16000}}}),
    "silero_vad_op18_ifless": ("silero_vad", "data/silero_vad_op18_ifless.onnx",
                               {"inputs": {"input": {"shape": [1, 512]},
                                           "sr": {"value": 16000}}}),
    "ort_sigmoid": ("onnxruntime", "datasets/sigmoid.onnx", {}),
    # scikit-learn logistic regression: ai.onnx.ml LinearClassifier + ZipMap (seq of maps)
    "ort_logreg_iris": ("onnxruntime", "datasets/logreg_iris.onnx", {}),
}  # fmt: skip
CORPUS_NAMES: tuple[str, ...] = (*_BUILT, *_SHIPPED)


@cache
def build_corpus() -> dict[str, CorpusModel]:
    """Every corpus model, built (or copied from its package) into a temporary folder that
    is removed when the process exits."""
    import importlib

    folder = Path(tempfile.mkdtemp(prefix="kquant-corpus-"))
    atexit.register(shutil.rmtree, folder, True)
    out: dict[str, CorpusModel] = {}
    for name, (build, validation) in _BUILT.items():
        origin = "onnx.helper" if name == "control_flow" else "torch.onnx.export"
        out[name] = CorpusModel(name, build(folder / f"{name}.onnx"), origin, validation)
    for name, (package, rel, validation) in _SHIPPED.items():
        src = Path(importlib.import_module(package).__file__).parent / rel
        dst = folder / f"{name}.onnx"
        shutil.copyfile(src, dst)
        out[name] = CorpusModel(name, dst, package, validation)
    return out
