"""FP16 on the conversion corpus (tests/corpus): every model converts, loads in onnxruntime
and passes the default FP16 tolerance against a real validation Reference, repaired where
needed, with its block lists reported. Table-driven: a changed outcome is a regression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from corpus import CORPUS_NAMES, build_corpus, feeds_for
from corpus.runs import reference, run_pass
from fp16_helpers import (
    fp32_tensors,
    make_probe,
    rel_error,
    run,
    tensors_of,
)
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

from kquant_api import Reason
from kquant_job.errors import PassError
from kquant_job.passes.onnx_fp16 import DEFAULT_OP_BLOCK_LIST
from kquant_job.validate.runtime import make_session

# The decomposed LayerNorm of loud_layernorm: Pow of ~1e3 activations gives ~6e5.
LOUD = {"/norm/Pow_output_0", "/norm/ReduceMean_1_output_0", "/norm/Add_output_0"}
# name -> (repaired, FP32 initializers kept for range, activations kept FP32 for range);
# measured with onnxruntime 1.31 CPU.
EXPECTED: dict[str, tuple[bool, dict[str, float], set[str]]] = {
    "speech_encoder": (False, {}, set()),
    "whisper_tiny": (False, {}, set()),
    "bert_tiny": (False, {}, set()),
    "cnn_upsample": (False, {"in_norm.running_var": 1e7}, set()),
    "lstm_gru": (False, {}, set()),
    "control_flow": (False, {}, set()),
    "loud_layernorm": (False, {}, LOUD),  # found by its ranges; CPU would hide the overflow
    "silero_vad": (False, {}, set()),
    "silero_vad_op18_ifless": (False, {}, set()),
    "ort_sigmoid": (False, {}, set()),
}
# Every op blocked (LinearClassifier/ZipMap must stay FP32): nothing would be FP16.
NOTHING_TO_CONVERT = {"ort_logreg_iris"}


def test_table_covers_the_corpus() -> None:
    assert set(EXPECTED) | NOTHING_TO_CONVERT == set(CORPUS_NAMES)


@pytest.mark.parametrize("name", sorted(NOTHING_TO_CONVERT))
def test_fp16_refuses_a_model_with_nothing_to_convert(name: str, tmp_path: Path) -> None:
    model = build_corpus()[name]
    with pytest.raises(PassError) as err:
        run_pass(model, "fp16", tmp_path, reference(model, "fp16").probe)
    assert err.value.reason is Reason.ConversionFailed
    assert "nothing was converted to FP16" in str(err.value)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fp16_converts_and_passes_default_tolerance(name: str, tmp_path: Path) -> None:
    model = build_corpus()[name]
    ref = reference(model, "fp16")
    result = run_pass(model, "fp16", tmp_path, ref.probe, ref.activation_ranges)
    repaired, fp32, activations = EXPECTED[name]
    details = result.details
    assert details["repaired"] is repaired
    assert details["fp32Initializers"] == fp32
    assert set(details["fp32Activations"]) == activations
    assert all(v > 65504 / 2 for v in details["fp32Activations"].values())
    # the final block lists are reported: the defaults plus what the ladder added
    assert set(DEFAULT_OP_BLOCK_LIST) <= set(details["opBlockList"])
    assert isinstance(details["nodeBlockList"], list)
    assert details["attempts"][-1]["outcome"] == "ok"
    make_session(result.output, ["CPUExecutionProvider"])  # loads
    final = ref.probe(result.output)
    assert final.ok, final.violations
    if fp32_tensors(onnx.load(str(model.path))):  # weights (any graph) became FP16
        assert tensors_of(onnx.load(str(result.output)), TensorProto.FLOAT16)


def test_batchnorm_variance_1e7_stays_fp32_and_is_reported(tmp_path: Path) -> None:
    model = build_corpus()["cnn_upsample"]
    result = run_pass(model, "fp16", tmp_path, reference(model, "fp16").probe)
    assert result.details["fp32Initializers"] == {"in_norm.running_var": 1e7}
    bn = next(n for n in onnx.load(str(model.path)).graph.node if n.op_type == "BatchNormalization")
    assert bn.name in result.details["nodeBlockList"]
    inits = {i.name: i for i in onnx.load(str(result.output)).graph.initializer}
    var = onnx.numpy_helper.to_array(inits["in_norm.running_var"])
    assert var.dtype == np.float32 and var.max() == np.float32(1e7)  # not clipped to 65504


def test_layernorm_overflow_found_by_activation_ranges_before_converting(
    tmp_path: Path,
) -> None:
    """The original's measured ranges (onnxruntime CPU, FP32) show Pow at ~6e5: the
    decomposed LayerNorm's Pow, ReduceMean and Add, and the nodes reading their outputs,
    stay FP32 from the first conversion on, without a repair attempt. onnx's reference
    evaluator, which computes each op in its declared type as CUDA kernels do, confirms the
    result is finite and close."""
    model = build_corpus()["loud_layernorm"]
    ref = reference(model, "fp16")
    result = run_pass(model, "fp16", tmp_path, ref.probe, ref.activation_ranges)
    details = result.details
    assert details["activationRanges"] == "measured"
    assert [a["step"] for a in details["attempts"]] == ["convert"]
    assert {"/norm/Pow", "/norm/ReduceMean_1", "/norm/Add", "/norm/Sqrt"} <= set(
        details["nodeBlockList"]
    )
    feeds = feeds_for(model, 1)[0]
    ref_out = run(model.path, feeds)[0]
    got = ReferenceEvaluator(str(result.output)).run(None, feeds)[0]
    assert np.isfinite(got).all() and rel_error(ref_out, got) < 1e-2
    # without the ranges the same conversion overflows (inf variance: the output collapses),
    # which the CPU probe cannot see
    plain = run_pass(model, "fp16", tmp_path / "plain", None)
    assert plain.details["activationRanges"] == "not measured"
    assert rel_error(ref_out, ReferenceEvaluator(str(plain.output)).run(None, feeds)[0]) > 0.1


def test_layernorm_overflow_detected_and_repaired(tmp_path: Path) -> None:
    """Without measured ranges (values inside subgraphs, say) the ladder repairs the same
    overflow: activations of ~1e3 into a decomposed LayerNorm, Pow gives ~1e6, inf in FP16.
    The probe runs the candidate in onnx's reference evaluator, which computes each op in
    its declared type as CUDA kernels do (onnxruntime's CPU provider computes these ops in
    FP32 and hides the overflow)."""
    model = build_corpus()["loud_layernorm"]
    feeds = feeds_for(model, 1)[0]
    probe = make_probe(model.path, feeds, fp16=True)
    result = run_pass(model, "fp16", tmp_path, probe)
    details = result.details
    first = details["attempts"][0]
    assert first["step"] == "convert" and first["outcome"] != "ok"
    assert details["repaired"] is True
    steps = [a["step"] for a in details["attempts"]]
    assert steps[:3] == ["convert", "fragile-ops", "fragile-ops"] and "bisect" in steps
    assert {"Pow", "ReduceMean", "Sqrt"} <= set(details["opBlockList"])
    assert details["nodeBlockList"] == ["/norm/Add"]  # var + eps, between FP32 ops
    ref = run(model.path, feeds)[0]
    got = ReferenceEvaluator(str(result.output)).run(None, feeds)[0]
    assert rel_error(ref, got) < 1e-2


@pytest.mark.parametrize("name", ["speech_encoder", "cnn_upsample", "loud_layernorm"])
def test_fp16_is_deterministic(name: str, tmp_path: Path) -> None:
    model = build_corpus()[name]
    probe = (
        make_probe(model.path, feeds_for(model, 1)[0], fp16=True)
        if name == "loud_layernorm"
        else reference(model, "fp16").probe
    )
    first = run_pass(model, "fp16", tmp_path / "a", probe)
    second = run_pass(model, "fp16", tmp_path / "b", probe)
    assert first.details == second.details
    assert first.output.read_bytes() == second.output.read_bytes()


def test_sequence_of_maps_outputs_are_compared() -> None:
    """ZipMap outputs (a list of {class: probability} per row) compare as a matrix."""
    from kquant_job.validate.metrics import compare_output

    a = [[{0: 0.9, 1: 0.1}, {0: 0.2, 1: 0.8}]]
    b = [[{0: 0.8, 1: 0.2}, {0: 0.2, 1: 0.8}]]
    m = compare_output("probabilities", a, b)
    assert not m.exact and m.elements == 4
    assert m.maxAbsError == pytest.approx(0.1) and m.meanAbsError == pytest.approx(0.05)


def test_keep_fp32_names_onnx_initializers_only_when_set(tmp_path: Path) -> None:
    """keepFp32 on a torch-exported ONNX model: matching initializers (dotted names or a
    dotted suffix) stay FP32 with every node reading them; unset, its PyTorch default does
    not apply to ONNX."""
    from kquant_api import QuantizationConfig
    from kquant_job.passes import PassContext
    from kquant_job.passes.onnx_fp16 import OnnxFp16Pass

    model = build_corpus()["speech_encoder"]
    ref = reference(model, "fp16")

    def convert(work: Path, **config: object) -> tuple[dict, dict[str, int]]:
        cfg = QuantizationConfig.model_validate({"precision": "fp16", **config})
        ctx = PassContext(work_dir=work / "scratch", probe=ref.probe)
        result = OnnxFp16Pass().run(model.path, cfg, work / "out.onnx", ctx)
        assert ref.probe(result.output).ok
        inits = onnx.load(str(result.output)).graph.initializer
        return result.details, {i.name: i.data_type for i in inits}

    details, types = convert(tmp_path / "kept", keepFp32=["fe_norm.*", "0.weight"])
    assert details["keepFp32"] == {
        "fe.0.weight": "0.weight",
        "fe_norm.bias": "fe_norm.*",
        "fe_norm.weight": "fe_norm.*",
    }
    for name in details["keepFp32"]:
        assert types[name] == TensorProto.FLOAT
    assert types["fe.3.weight"] == TensorProto.FLOAT16
    graph = onnx.load(str(model.path)).graph
    readers = {n.name for n in graph.node if set(n.input) & set(details["keepFp32"])}
    assert readers and readers <= set(details["nodeBlockList"])

    default, default_types = convert(tmp_path / "default")
    assert default["keepFp32"] == {} and default_types["fe_norm.weight"] == TensorProto.FLOAT16
