"""PyTorch static INT8 for a model whose code is trusted: a Hugging Face folder (config.json
naming a transformers class, safetensors weights) is rebuilt with transformers inside the
sandbox, exported to ONNX, checked against PyTorch, and quantized like any ONNX model; the
worker process end to end, on small models with random weights built from transformers
configs (a Wav2Vec2 CTC model on speech frames, a BERT encoder on token ids)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from corpus.hf import bert, wav2vec2_ctc
from published import Prefix, read_set
from worker_helpers import manifest, run_worker

from kquant_api import REASON_EXIT_CODE, Reason

CLIP = Path(__file__).parents[2] / "job_image" / "kquant_job" / "data" / "speech_16k.wav"


@pytest.fixture(scope="module")
def w2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wav2vec2_ctc(tmp_path_factory.mktemp("hf") / "wav2vec2")


def _report(run) -> dict:
    return json.loads(Path(run.result["reportUri"].removeprefix("file://")).read_text())


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_wav2vec2_static_int8_calibrated_on_speech_frames(w2v: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib"
    frames = subprocess.run(
        [sys.executable, "-m", "kquant_job.cli", "frames", str(CLIP), str(calib),
         "--input", "input_values", "--frame-size", "8000"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert frames.returncode == 0, frames.stderr
    quantization = {"precision": "int8", "mode": "static", "requireGain": False,
                    "calibration": {"uri": f"file://{calib}/"}}  # fmt: skip
    job = manifest(f"file://{w2v}/", f"file://{tmp_path}/out/", quantization, endpoint=None)
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert (run.code, run.result["reason"]) == (0, "Validated"), run.log
    out = Prefix.of(f"file://{tmp_path}/out/")
    read_set(out)
    assert out.fixed_names() == sorted(["model.onnx", "config.json", "preprocessor_config.json",
                                        "report.json", "manifest.json"])  # fmt: skip
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(tmp_path / "out" / "model.onnx")
    model = _report(run)["models"][0]
    assert (model["format"], model["path"]) == ("transformers", "model.safetensors")
    assert model["pass"] == "transformers_export+onnx-int8-static"
    export = model["details"]["export"]
    assert (export["architecture"], export["inputs"], export["outputs"]) == (
        "Wav2Vec2ForCTC",
        ["input_values"],
        ["logits"],
    )
    assert export["fidelity"]["logits"]["cosineSimilarity"] >= 0.9999
    assert model["originalBytes"] == (w2v / "model.safetensors").stat().st_size
    assert "export: done" in run.log and "sandbox: confined" in run.log


def test_wav2vec2_dynamic_int8_and_its_table(w2v: Path, tmp_path: Path) -> None:
    job = manifest(f"file://{w2v}/", f"file://{tmp_path}/out/",
                   {"precision": "int8", "requireGain": False}, endpoint=None)  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert (run.code, run.result["reason"]) == (0, "Validated"), run.log
    assert "MatMulInteger" in _ops(tmp_path / "out" / "model.onnx")
    assert run.result["quantizedBytes"] < 0.7 * run.result["originalBytes"]
    assert "input_values [1, 16000] speech" in run.log  # zero-config inputs on the export
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_bert_variants_on_token_ids(tmp_path: Path) -> None:
    folder = bert(tmp_path / "bert")
    job = manifest(f"file://{folder}/", f"file://{tmp_path}/out/", {}, endpoint=None)
    del job["spec"]["quantization"]
    job["spec"]["model"]["format"] = "transformers"  # fp16 exported too, not cast
    job["spec"]["variants"] = [{"precision": "fp16"},
                               {"precision": "int8", "requireGain": False}]  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert run.code == 0, run.log
    assert run.result["chosen"] == "int8"  # the smallest
    out = tmp_path / "out"
    assert (
        "Cast" in _ops(out / "fp16" / "model.onnx")
        or onnx.load(str(out / "fp16" / "model.onnx")).graph.initializer[0].data_type
        == onnx.TensorProto.FLOAT16
    )
    models = {m["variant"]: m for m in _report(run)["models"]}
    assert models["fp16"]["pass"] == "transformers_export+onnx-fp16"
    export = models["int8"]["details"]["export"]
    assert export["inputs"] == ["input_ids", "attention_mask"]
    assert export["outputs"] == ["last_hidden_state", "pooler_output"]


def test_a_name_that_is_no_transformers_class_is_refused(w2v: Path, tmp_path: Path) -> None:
    folder = tmp_path / "fake"
    folder.mkdir()
    for name in ("model.safetensors", "preprocessor_config.json"):
        (folder / name).write_bytes((w2v / name).read_bytes())
    config = json.loads((w2v / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["os"]}))
    job = manifest(f"file://{folder}/", f"file://{tmp_path}/out/", {"precision": "int8"},
                   endpoint=None)  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert run.result["reason"] == "UnsupportedFormat", run.log
    assert run.code == REASON_EXIT_CODE[Reason.UnsupportedFormat]
    assert "'os', which is no model class of transformers" in run.result["message"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_dry_run_plans_the_export(w2v: Path, tmp_path: Path) -> None:
    job = manifest(f"file://{w2v}/", f"file://{tmp_path}/out/", {"precision": "int8"},
                   endpoint=None)  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ), ("--dry-run",))
    assert run.code == 0, run.log
    assert "-> model.onnx with transformers_export+onnx-int8-dynamic" in run.log
    assert "copy preprocessor_config.json" in run.log
    assert not (tmp_path / "out").exists()
