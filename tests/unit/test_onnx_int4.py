"""INT4 weight-only (MatMulNBits) on the corpus' transformer models: q4 (RTN or HQQ) and q4f16
replace every MatMul on a constant weight, shrink the file and hold int4's default
tolerance; models without such a MatMul, and already quantized ones, are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from corpus import build_corpus, feeds_for
from corpus.runs import SAMPLES

from kquant_api import DEFAULT_TOLERANCE, Precision, QuantizationConfig, Reason
from kquant_job.errors import PassError
from kquant_job.passes import PassContext, select_pass
from kquant_job.passes.onnx_common import iter_nodes, load_model
from kquant_job.passes.onnx_int4 import OnnxInt4Pass, weighted_matmuls
from kquant_job.validate import Reference


def reference(name: str) -> Reference:
    model = build_corpus()[name]
    tolerance = DEFAULT_TOLERANCE[Precision.int4]
    feeds, config = feeds_for(model, SAMPLES), model.config(SAMPLES)
    return Reference(model.path, feeds, config, tolerance, providers=["CPUExecutionProvider"])


def convert(name: str, tmp_path: Path, **knobs: object):
    model = build_corpus()[name]
    config = QuantizationConfig.model_validate({"precision": "int4", **knobs})
    ctx = PassContext(work_dir=tmp_path / "scratch", probe=reference(name).probe)
    ctx.work_dir.mkdir(parents=True)
    out = tmp_path / "out" / f"{name}_{config.label}.onnx"
    return model, OnnxInt4Pass().run(model.path, config, out, ctx)


@pytest.mark.parametrize(
    ("name", "knobs"),
    [
        ("bert_tiny", {}),
        ("bert_tiny", {"algorithm": "hqq"}),
        ("speech_encoder", {"blockSize": 16, "symmetric": False}),
        ("bert_tiny", {"floatPrecision": "fp16"}),
    ],
)
def test_int4_replaces_every_weighted_matmul_and_holds_the_tolerance(name, knobs, tmp_path):
    model, result = convert(name, tmp_path, **knobs)
    details = result.details
    converted = load_model(result.output)
    ops = [n.op_type for _, n in iter_nodes(converted.graph)]
    assert ops.count("MatMulNBits") == details["matmulNBits"] == details["candidates"]
    assert details["candidates"] == len(weighted_matmuls(load_model(model.path)))
    assert result.output.stat().st_size < 0.6 * model.path.stat().st_size
    assert details["probePassed"] is True, details["probe"]
    assert reference(name).probe(result.output).ok
    if knobs.get("floatPrecision") == "fp16":
        assert details["fp16"]["opBlockList"]  # the FP16 pass ran first
        assert "Cast" in ops


def test_q4f16_is_smaller_than_q4(tmp_path):
    _, q4 = convert("bert_tiny", tmp_path / "a")
    _, q4f16 = convert("bert_tiny", tmp_path / "b", floatPrecision="fp16")
    assert q4f16.output.stat().st_size < q4.output.stat().st_size


def test_a_model_without_matmul_weights_is_refused_with_what_its_weights_feed(tmp_path):
    with pytest.raises(PassError) as info:
        convert("cnn_upsample", tmp_path)
    assert info.value.reason is Reason.ConversionFailed
    assert "has none (its weights feed" in str(info.value) and "Conv" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_an_int4_model_is_already_quantized(tmp_path):
    _, first = convert("bert_tiny", tmp_path / "a")
    config = QuantizationConfig(precision="int4")
    ctx = PassContext(work_dir=tmp_path / "b")
    ctx.work_dir.mkdir(parents=True)
    with pytest.raises(PassError) as info:
        OnnxInt4Pass().run(first.output, config, tmp_path / "again.onnx", ctx)
    assert info.value.reason is Reason.AlreadyQuantized


def test_int4_is_for_onnx_only():
    from kquant_api import ModelFormat

    config = QuantizationConfig(precision="int4")
    assert select_pass(ModelFormat.onnx, config).name == "onnx-int4-weight-only"
    for fmt in (ModelFormat.torchscript, ModelFormat.pytorch, ModelFormat.safetensors):
        with pytest.raises(PassError, match="applies to ONNX models"):
            select_pass(fmt, config)
