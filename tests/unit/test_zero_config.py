"""Zero-config validation: the minimal spec (model, output, precision) converts and validates
the project's corpus (every ONNX model, Silero's ONNX and TorchScript files, the corpus
architectures as TorchScript), and says what it chose; when nothing runs, the error says
what to add."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import silero_dir
from corpus import build_corpus
from corpus import torch_archs as archs

from kquant_api import QuantizationJob
from kquant_job.errors import InvalidSpec
from kquant_job.stage import StageInput, convert_and_validate

# the arguments each architecture was exported with (tests/corpus/build.py)
TOKENS = torch.zeros(1, 4, dtype=torch.long)
TRACED = {
    "speech_encoder": (archs.SpeechEncoder, (torch.zeros(1, 800),)),
    "whisper_tiny": (archs.WhisperTiny, (torch.zeros(1, 16, 20), TOKENS)),
    "cnn_upsample": (archs.UpsampleCNN, (torch.zeros(1, 3, 16, 16),)),
    "lstm_gru": (archs.RecurrentNet, (torch.zeros(1, 10, 16),)),
    "loud_layernorm": (archs.LoudLayerNorm, (torch.zeros(2, 16),)),
}  # fmt: skip


def torchscript_corpus(folder: Path) -> dict[str, Path]:
    out = {"silero_vad.jit": silero_dir() / "silero_vad.jit"}
    for name, (cls, args) in TRACED.items():
        torch.manual_seed(0)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(cls().eval(), args)
        out[f"{name}.pt"] = folder / f"{name}.pt"
        torch.jit.save(traced, str(out[f"{name}.pt"]))
    return out


def minimal_job(model: Path) -> QuantizationJob:
    return QuantizationJob.model_validate(
        {
            "apiVersion": "kquant.io/v1alpha1",
            "kind": "QuantizationJob",
            "metadata": {"name": "minimal"},
            "spec": {
                "model": {"uri": f"file://{model}"},
                "output": {"uri": "file:///unused/"},
                "quantization": {"precision": "fp16"},
            },
        }
    )


def run_minimal(model: Path, work: Path):
    io = StageInput(model, [], work / "data", [], work / "calib", work / "staged", work / "s")
    return convert_and_validate(minimal_job(model), io)


def test_the_minimal_spec_validates_the_corpus(tmp_path, capsys):
    models = {f"{n}.onnx": m.path for n, m in build_corpus().items()}
    models.update({p.name: p for p in silero_dir().glob("*.onnx")})
    models.update(torchscript_corpus(tmp_path))
    rows, passed = [], 0
    for name, path in sorted(models.items()):
        try:
            outcome = run_minimal(path, tmp_path / "work" / name)
        except Exception as exc:
            rows.append(f"{name:32} FAILED {type(exc).__name__}: {str(exc)[:120]}")
            continue
        [model] = outcome.models
        ok = model.validation["passed"]
        passed += ok
        chosen = model.validation["report"]["inputsChosen"]
        inputs = "; ".join(f"{k} {v}" for k, v in chosen["inputs"].items())
        rows.append(f"{name:32} {'validated' if ok else 'tolerance missed'}: {inputs}")
    with capsys.disabled():
        print("\nminimal spec on the corpus:\n  " + "\n  ".join(rows))
    # ort_logreg_iris is all ai.onnx.ml operators, which have no FP16: ConversionFailed
    assert passed / len(models) >= 0.95, rows
    assert len(models) >= 20


def test_nothing_runs_says_what_to_add(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # x [1, ?] reshaped to [1, 333]: runs on 333 samples only, a length nobody would guess
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 333])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 333])], [shape],
    )  # fmt: skip
    model = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), model)  # fmt: skip
    with pytest.raises(InvalidSpec) as info:
        run_minimal(model, tmp_path / "work")
    message = str(info.value)
    assert "runs on none of the 6 inputs kquant tried" in message
    assert "x [1, 16000] speech" in message and "x [1, 256] speech" in message  # all 6 shown
    assert message.endswith("validation:\n  inputs:\n    x: {shape: [1, 16000]}")
