"""The ONNX FP16 pass on every Silero VAD variant: loads, FP16 weights, FP32 I/O, close
outputs; user block lists; determinism; reading onnxruntime's error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import silero_onnx_variants
from fp16_helpers import (
    OPTS,
    batchnorm_model,
    convert,
    fp32_tensors,
    make_probe,
    overflow_model,
    rel_error,
    run,
    session,
    silero_feeds,
    tensors_of,
)
from onnx import TensorProto

from kquant_api import QuantizationConfig
from kquant_job.passes.onnx_common import (
    iter_nodes,
    load_model,
    name_unnamed_nodes,
)
from kquant_job.passes.onnx_fp16 import DEFAULT_OP_BLOCK_LIST


@pytest.mark.parametrize("variant", silero_onnx_variants(), ids=lambda p: p.stem)
def test_every_silero_variant_converts(variant: Path, tmp_path: Path) -> None:
    feeds = silero_feeds(variant)
    result = convert(variant, tmp_path, probe=make_probe(variant, feeds))
    out = result.output
    converted = onnx.load(str(out))
    sess = session(out)  # loads
    assert {i.type for i in sess.get_inputs() if i.name != "sr"} == {"tensor(float)"}
    assert {o.type for o in sess.get_outputs()} == {"tensor(float)"}
    # Every float weight is FP16 except the ones nothing converted reads (unused ones).
    original = onnx.load(str(variant))
    name_unnamed_nodes(original)
    read_by_converted = {
        name
        for _, node in iter_nodes(original.graph)
        if node.op_type not in result.details["opBlockList"]
        and node.name not in result.details["nodeBlockList"]
        for name in node.input
    }
    assert fp32_tensors(converted) <= fp32_tensors(original) - read_by_converted
    assert tensors_of(converted, TensorProto.FLOAT16), "no FP16 weights"
    assert out.stat().st_size < 0.7 * variant.stat().st_size
    for batch in (1, 4) if "sequence" in variant.name else (1,):
        feeds = silero_feeds(variant, batch=batch, seed=batch)
        for ref, got in zip(run(variant, feeds), run(out, feeds), strict=True):
            assert rel_error(ref, got) < 1e-2
    assert result.details["converter"] == "onnxruntime.transformers.float16"
    assert result.details["keepIoTypes"] is True


def test_model_that_onnxconverter_common_breaks(silero_onnx: Path, tmp_path: Path) -> None:
    from onnxconverter_common import float16 as occ

    broken = occ.convert_float_to_float16(onnx.load(str(silero_onnx)), keep_io_types=True)
    with pytest.raises(Exception, match=r"(?i)type"):
        ort.InferenceSession(broken.SerializeToString(), OPTS, providers=["CPUExecutionProvider"])
    result = convert(silero_onnx, tmp_path)
    feeds = silero_feeds(silero_onnx)
    assert rel_error(run(silero_onnx, feeds)[0], run(result.output, feeds)[0]) < 1e-3


def test_user_block_lists_are_honoured(silero_onnx: Path, tmp_path: Path) -> None:
    original = onnx.load(str(silero_onnx))
    name_unnamed_nodes(original)
    convs = [n for _, n in iter_nodes(original.graph) if n.op_type == "Conv"]
    lstm = next(n for _, n in iter_nodes(original.graph) if n.op_type == "LSTM")
    config = QuantizationConfig(precision="fp16", opBlockList=["Conv"], nodeBlockList=[lstm.name])
    extended = convert(silero_onnx, tmp_path / "extended", config=config)
    assert {"Conv", *DEFAULT_OP_BLOCK_LIST} <= set(extended.details["opBlockList"])  # added to
    config = config.model_copy(update={"replaceOpBlockList": True})
    result = convert(silero_onnx, tmp_path, config=config)
    assert result.details["opBlockList"] == ["Conv"]  # replaces the default list
    assert result.details["nodeBlockList"] == [lstm.name]
    converted = onnx.load(str(result.output))
    # a blocked node's output is renamed <name>_cast_to_fp16 by the converter
    kept = {n.removesuffix("_cast_to_fp16") for n in fp32_tensors(converted)}
    assert {n.input[1] for n in convs} <= kept  # the Conv weights were never rounded
    casts_to_fp32 = {
        n.output[0]
        for _, n in iter_nodes(converted.graph)
        if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT
    }
    lstm_out = next(n for _, n in iter_nodes(converted.graph) if n.name == lstm.name)
    assert set(lstm_out.input[:3]) <= casts_to_fp32  # X, W, R reach the LSTM as FP32
    feeds = silero_feeds(silero_onnx)
    for ref, got in zip(run(silero_onnx, feeds), run(result.output, feeds), strict=True):
        assert rel_error(ref, got) < 1e-2


def test_default_op_block_list() -> None:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST as ORT_LIST

    assert list(DEFAULT_OP_BLOCK_LIST) == sorted(set(DEFAULT_OP_BLOCK_LIST))
    assert set(ORT_LIST) | {"Resize", "RandomNormalLike"} <= set(DEFAULT_OP_BLOCK_LIST)


def test_keep_io_types_false_gives_fp16_io(tmp_path: Path) -> None:
    model = batchnorm_model(tmp_path / "bn.onnx")
    result = convert(
        model, tmp_path, config=QuantizationConfig(precision="fp16", keepIoTypes=False)
    )
    sess = session(result.output)
    assert [i.type for i in sess.get_inputs()] == ["tensor(float16)"]
    assert [o.type for o in sess.get_outputs()] == ["tensor(float16)"]


def test_deterministic(silero_onnx: Path, tmp_path: Path) -> None:
    for model in (silero_onnx, overflow_model(tmp_path / "overflow.onnx")):
        feeds = silero_feeds(model) if model == silero_onnx else {"x": np.ones((4, 64), np.float32)}
        outs = [convert(model, tmp_path / str(i), probe=make_probe(model, feeds)).output
                for i in range(2)]  # fmt: skip
        assert outs[0].read_bytes() == outs[1].read_bytes()


PAD = "If_0_then_branch__Inline_0__/stft/padding/Pad"
UNSQUEEZE = "If_0_else_branch__Inline_0__/decoder/rnn/Unsqueeze_3"


@pytest.mark.parametrize(
    ("message", "expected"),
    [  # messages seen from onnxruntime 1.31 on converted Silero models
        (f"Node (If_0) Op (If) [TypeInferenceError] Graph attribute inferencing failed: Type "
         f"Error: Type (tensor(float16)) of output arg ({PAD}_output_0) of node ({PAD}) does "
         "not match expected type (tensor(float)).", PAD),
        (f"Non-zero status code returned while running Pad node. Name:'{PAD}' Status Message: "
         "Pad reflect requires axis length >= 2", PAD),
        (f"Invalid model. Node input '{UNSQUEEZE}_output_0' is not a graph input, initializer, "
         "or output of a previous node.", UNSQUEEZE),
        (f"This is an invalid model. Error: two nodes with same node name ({UNSQUEEZE}_output_0"
         "_cast_to_fp32_node).", UNSQUEEZE),
        (f"Type Error: Type (tensor(float16)) of output arg (F0::If_9_then_branch__Inline_0__"
         f"{PAD}_output_0) of node (F0::If_9_then_branch__Inline_0__{PAD})", PAD),
        ("Node (If_0) Op (If) [TypeInferenceError] something inside", "If_0"),
        ("Load model failed: protobuf parsing failed", None),
    ],
)  # fmt: skip
def test_culprit_from_onnxruntime_messages(silero_onnx: Path, message: str, expected) -> None:
    from kquant_job.passes.onnx_fp16_ladder import culprit

    model = load_model(silero_onnx)
    name_unnamed_nodes(model)
    assert culprit(message, model, set(DEFAULT_OP_BLOCK_LIST), set()) == expected
    if expected:  # never names a node that is already kept FP32
        again = culprit(message, model, set(DEFAULT_OP_BLOCK_LIST), {expected})
        assert again != expected
