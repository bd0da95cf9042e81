"""The worker measures the original's activation ranges on its validation samples and keeps
FP32 what FP16 cannot hold: the real ``kquant-job`` process, file:// storage, a LayerNorm
whose Pow reaches ~6e5 (tests/corpus ``loud_layernorm``). onnxruntime's CPU provider would
hide that overflow; onnx's reference evaluator, which computes in the declared types as CUDA
kernels do, checks the published model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from corpus import build_corpus, feeds_for
from onnx.reference import ReferenceEvaluator
from worker_helpers import manifest, run_worker


def test_activations_beyond_fp16_stay_fp32_and_are_reported(tmp_path: Path) -> None:
    corpus_model = build_corpus()["loud_layernorm"]
    source = tmp_path / "models" / "loud.onnx"
    source.parent.mkdir()
    shutil.copy(corpus_model.path, source)
    out = tmp_path / "out"
    job = manifest(
        source.as_uri(),
        out.as_uri() + "/",
        {"precision": "fp16", "requireGain": False},  # 3 KB: its Casts outweigh the halving
        endpoint=None,
        validation={"samples": 4},
    )
    run = run_worker(job, tmp_path)
    assert run.code == 0, run.log
    assert "keeping activations beyond the FP16 range FP32" in run.log
    report = json.loads((out / "report.json").read_text())
    [details] = [m["details"] for m in report["models"]]
    assert details["activationRanges"] == "measured"
    assert "/norm/Pow_output_0" in details["fp32Activations"]
    assert details["fp32Activations"]["/norm/Pow_output_0"] > 65504
    assert {"/norm/Pow", "/norm/ReduceMean_1"} <= set(details["nodeBlockList"])
    feeds = feeds_for(corpus_model, 1)[0]
    expected = ReferenceEvaluator(str(source)).run(None, feeds)[0]
    got = ReferenceEvaluator(str(out / "loud_fp16.onnx")).run(None, feeds)[0]
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-2 * max(1.0, float(np.abs(expected).max()))
