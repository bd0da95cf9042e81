"""INT8 that is worth having, end to end through the worker process: an INT8 result within
tolerance but larger (or slower) than its original ends in NoGain and publishes nothing
unless ``requireGain: false``; an already quantized model is refused as AlreadyQuantized;
both leave their report.json and nothing else."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
from conftest import silero_dir
from corpus import build_corpus
from onnx import TensorProto, helper, numpy_helper
from worker_helpers import manifest, run_worker

# values of the size the corpus feeds it (normal(0, 0.5)): its Loop's tanh stays in range
SMALL_INPUTS = {"inputs": {"x": {"low": -0.5, "high": 0.5}}}


def _report(run) -> dict:
    return json.loads(Path(run.result["reportUri"].removeprefix("file://")).read_text())


def _control_flow(tmp_path: Path) -> Path:
    """The corpus' Loop/If graph: two 8x8 weights, so INT8's scales, zero points and
    DynamicQuantizeLinear nodes outweigh the bytes saved (2.1x the FP32 file)."""
    model = tmp_path / "m" / "control_flow.onnx"
    model.parent.mkdir(parents=True)
    shutil.copyfile(build_corpus()["control_flow"].path, model)
    return model


def test_a_larger_int8_result_is_no_gain_and_not_published(tmp_path: Path) -> None:
    model = _control_flow(tmp_path)
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", {"precision": "int8"},
                   endpoint=None, validation=SMALL_INPUTS)  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert (run.code, run.result["reason"]) == (40, "NoGain"), run.log
    assert "x the original's size" in run.result["message"]
    assert "requireGain: false" in run.result["message"]
    assert run.result["validation"]["passed"] is True  # accurate, just not worth it
    assert run.result["quantizedBytes"] > run.result["originalBytes"]
    report = _report(run)
    assert report["outcome"]["reason"] == "NoGain" and report["outcome"]["phase"] == "Failed"
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.iterdir()) == [".kquant"]  # the failure's set only


def test_require_gain_false_publishes_it_with_a_note(tmp_path: Path) -> None:
    model = _control_flow(tmp_path)
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/",
                   {"precision": "int8", "requireGain": False}, endpoint=None,
                   validation=SMALL_INPUTS)  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert (run.code, run.result["reason"]) == (0, "Validated"), run.log
    assert any(n.startswith("not smaller than the original") for n in run.result["notes"])
    assert (tmp_path / "out" / "control_flow_int8.onnx").is_file()


def _mlp(tmp_path: Path) -> Path:
    """Three MatMuls of 512x1024, 1024x1024 and 1024x256 FP32 weights on a [32, 512] input
    (7.3 MB): INT8 dynamic makes it 0.25x the size and 3.1x faster on an AVX2 CPU, a gain on
    any CPU. (Silero's INT8 is 1.2-1.7x slower than FP32, by CPU: its verdict is the CPU's.)"""
    rng = np.random.default_rng(0)
    dims = [512, 1024, 1024, 256]
    nodes, weights, prev = [], [], "x"
    for i, (rows, cols) in enumerate(itertools.pairwise(dims)):
        w = (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"], name=f"mm{i}"))
        prev = f"mm{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"relu{i}"], name=f"relu{i}"))
            prev = f"relu{i}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, dims[0]])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [32, dims[-1]])], weights,
    )  # fmt: skip
    model = tmp_path / "m" / "mlp.onnx"
    model.parent.mkdir(parents=True)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8  # what onnxruntime loads, whatever onnx's newest is
    onnx.save(proto, model)
    return model


def test_an_int8_result_that_pays_off_is_published(tmp_path: Path) -> None:
    model = _mlp(tmp_path)
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", {"precision": "int8"},
                   endpoint=None, validation={"latencyRuns": 20})  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert (run.code, run.result["reason"]) == (0, "Validated"), run.log
    assert run.result["quantizedBytes"] <= 0.9 * run.result["originalBytes"]


def test_an_already_quantized_model_is_refused(tmp_path: Path) -> None:
    from kquant_api import QuantizationConfig
    from kquant_job.passes import PassContext
    from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass

    model = tmp_path / "m" / "silero_vad_int8.onnx"
    (tmp_path / "scratch").mkdir()
    config = QuantizationConfig(precision="int8")  # INT8 by kquant, as a user kept it
    ctx = PassContext(work_dir=tmp_path / "scratch")
    OnnxInt8DynamicPass().run(silero_dir() / "silero_vad.onnx", config, model, ctx)
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", {"precision": "int8"},
                   endpoint=None)  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert (run.code, run.result["reason"]) == (30, "AlreadyQuantized"), run.log
    message = run.result["message"]
    assert "silero_vad_int8.onnx is already quantized" in message
    assert "DynamicQuantizeLinear" in message or "MatMulInteger" in message
    assert _report(run)["outcome"]["reason"] == "AlreadyQuantized"
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_fp16_of_an_int8_model_is_refused(tmp_path: Path) -> None:
    """FP16 of a model kquant had made INT8 was published as a new FP16 model at 1.00x the
    size: only its scales were float."""
    from kquant_api import QuantizationConfig
    from kquant_job.passes import PassContext
    from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass

    model = tmp_path / "m" / "silero_vad_int8.onnx"
    (tmp_path / "scratch").mkdir()
    ctx = PassContext(work_dir=tmp_path / "scratch")
    config = QuantizationConfig(precision="int8")
    OnnxInt8DynamicPass().run(silero_dir() / "silero_vad.onnx", config, model, ctx)
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", {"precision": "fp16"},
                   endpoint=None)  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert (run.code, run.result["reason"]) == (30, "AlreadyQuantized"), run.log
    assert "FP16 would convert only its float remainder" in run.result["message"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def _conv_stack(path: Path) -> Path:
    """Four 3x3 convolutions of 64 channels on a 128x128 image (0.45 MB): dynamic INT8 makes
    them ConvInteger, 0.26x the size and, in onnxruntime 1.31 on the CPU, 7.7x slower (34 vs
    264 ms on 2 AVX2 cores): far past the few-runs rule's 5 ms on any CPU (at 64x64 a
    many-core CPU would bring it near)."""
    import torch

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for channels in (3, 64, 64, 64):
        layers += [torch.nn.Conv2d(channels, 64, 3, padding=1), torch.nn.ReLU()]
    path.parent.mkdir(parents=True)
    with warnings.catch_warnings():  # the TorchScript-based exporter's deprecation notices
        warnings.simplefilter("ignore")
        module, example = torch.nn.Sequential(*layers).eval(), torch.randn(1, 3, 128, 128)
        torch.onnx.export(module, (example,), str(path), input_names=["x"], output_names=["y"],
                          dynamo=False)  # fmt: skip
    return path


def test_a_slow_int8_conv_timed_a_few_times_is_no_gain(tmp_path: Path) -> None:
    """Timed 3 times (a large model within its latency budget), a 6x slower INT8 Conv net
    was published as Validated: a few runs decided nothing. Past 2x they do now, and the
    message names the ConvInteger kernels and static INT8."""
    model = _conv_stack(tmp_path / "m" / "convs.onnx")
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/",
                   {"precision": "int8", "strict": True}, endpoint=None,
                   validation={"latencyRuns": 3})  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert (run.code, run.result["reason"]) == (40, "NoGain"), run.log
    message = run.result["message"]
    assert "x the original's latency" in message and "3 runs" in message, message
    assert "ConvInteger" in message and "mode: static" in message
    assert run.result["quantizedBytes"] < 0.5 * run.result["originalBytes"]  # small, but slow
    assert not (tmp_path / "out" / "manifest.json").exists()
