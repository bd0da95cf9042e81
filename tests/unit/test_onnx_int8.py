"""INT8 passes (onnxruntime quantize_dynamic / quantize_static) on every Silero VAD ONNX
variant: what the produced files contain, that they run on speech frames (the speech
fixture, else a synthetic voiced signal), the settings honoured, and the fallback ladder
with the real validation probe. Small-graph cases and errors: test_onnx_int8_graphs.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SPEECH_WAV, silero_onnx_variants
from onnx import TensorProto, numpy_helper

from kquant_api import QuantizationConfig, Reason, Tolerance, ValidationConfig
from kquant_job.audio import frame_feeds, read_wav, thread_state, write_feeds
from kquant_job.errors import PassError
from kquant_job.passes import PassContext
from kquant_job.passes.onnx_common import iter_graphs, iter_nodes, subgraphs
from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass
from kquant_job.passes.onnx_int8_static import OnnxInt8StaticPass
from kquant_job.validate import Reference
from kquant_job.validate.runtime import make_session, run_stream

VARIANTS = silero_onnx_variants()
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM", "QLinearConv"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def speech() -> np.ndarray:
    """16 kHz mono float32 in [-1, 1]: the speech fixture, else a voiced-like signal
    (harmonics of a gliding 120-220 Hz pitch, syllable-rate envelope) between silences."""
    if SPEECH_WAV.exists():
        return read_wav(SPEECH_WAV)[0]
    t = np.arange(int(3.0 * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(170 + 50 * np.sin(2 * np.pi * 0.7 * t)) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * (np.abs(t - 1.5) < 1.0)
    noise = np.random.default_rng(0).normal(0, 0.003, t.size)
    return (0.3 * voiced * env + noise).astype(np.float32)


def silero_feeds(model: Path, start: int, count: int) -> list[dict[str, np.ndarray]]:
    """Speech frames ``start .. start+count`` (64 context + 512 samples each, as Silero's
    wrapper feeds them) for a variant: one block with zero h/c for the sequence export, else
    one feed per frame with a zero state (and sr=16000 where it is an input)."""
    names = [i.name for i in session(model).get_inputs()]
    extra = {"state": np.zeros((2, 1, 128), np.float32)}
    if "sr" in names:
        extra["sr"] = np.array(16000, np.int64)
    feeds = frame_feeds(speech(), 512, "input", context=64, extra=extra)[start : start + count]
    if "h" in names:
        zeros = np.zeros((1, 1, 128), np.float32)
        return [{"input": np.concatenate([f["input"] for f in feeds]), "h": zeros, "c": zeros}]
    return feeds


def session(path: Path) -> object:
    return make_session(path, ["CPUExecutionProvider"])


def stream(model: Path, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs per feed, stateN threaded into state as a streaming caller does."""
    feedback = {"stateN": "state"} if "state" in feeds[0] else {}
    return run_stream(session(model), feeds, feedback)


def write_calibration(model: Path, folder: Path, count: int = 3) -> list[Path]:
    """``count`` .npz feeds from speech frames carrying the FP32 model's real state."""
    feeds = silero_feeds(model, 30, count)
    if "h" in feeds[0]:  # sequence export: one block of 4 frames per file
        feeds = [silero_feeds(model, 30 + 4 * i, 4)[0] for i in range(count)]
    if "state" in feeds[0]:
        feeds = thread_state(model, feeds, {"stateN": "state"}, ["CPUExecutionProvider"])
    return write_feeds(feeds, folder, prefix="calib")


def cfg(**kw: object) -> QuantizationConfig:
    return QuantizationConfig.model_validate({"precision": "int8", **kw})


def static_cfg(**kw: object) -> QuantizationConfig:
    return cfg(mode="static", calibration={"uri": "file:///calib/", "samples": 3}, **kw)


def ops_by_scope(path: Path) -> tuple[list[str], list[str]]:
    """Op types of the main graph and of every subgraph of the produced file."""
    model = onnx.load(str(path))
    main = [n.op_type for n in model.graph.node]
    inner = [i.op_type for n in model.graph.node for s in subgraphs(n) for _, i in iter_nodes(s)]
    return main, inner


def int8_weights(path: Path) -> dict[str, np.ndarray]:
    """Quantized weights (initializers of 8-bit type with more than one element)."""
    model = onnx.load(str(path))
    return {
        t.name: numpy_helper.to_array(t)
        for g in iter_graphs(model.graph)
        for t in g.initializer
        if t.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(t.dims) >= 2
    }


def conv_only_in_subgraphs(model: Path) -> bool:
    main, inner = ops_by_scope(model)
    return "Conv" not in main and "Conv" in inner


def check_runs_like_fp32(model: Path, quantized: Path) -> None:
    feeds = silero_feeds(model, 30, 6)
    for ref, got in zip(stream(model, feeds), stream(quantized, feeds), strict=True):
        assert {k: v.shape for k, v in ref.items()} == {k: v.shape for k, v in got.items()}
        assert all(np.isfinite(v).all() for v in got.values())


@pytest.mark.parametrize("model", VARIANTS, ids=[p.stem for p in VARIANTS])
def test_dynamic_on_every_silero_variant(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / model.name
    result = OnnxInt8DynamicPass().run(model, cfg(), out, PassContext(work_dir=tmp_path / "w"))
    assert result.output == out and out.exists()
    check_runs_like_fp32(model, out)
    main, inner = ops_by_scope(out)
    integer = [op for op in main + inner if op in INTEGER_OPS]
    assert integer and result.details["quantizedNodes"] >= len(integer)
    if conv_only_in_subgraphs(model):  # the weights live in If branches
        assert "ConvInteger" in inner and "Conv" not in inner
        assert result.details["quantizedNodesInSubgraphs"] > 0
    weights = int8_weights(out)
    assert weights and all(w.dtype == np.int8 for w in weights.values())  # QInt8 default
    assert result.details["preprocess"] in ("applied", "skipped")
    assert result.details["attempts"][0]["attempt"] == "requested"


@pytest.mark.parametrize("model", VARIANTS, ids=[p.stem for p in VARIANTS])
def test_static_qdq_on_every_silero_variant(model: Path, tmp_path: Path) -> None:
    files = write_calibration(model, tmp_path / "calib")
    out = tmp_path / "out" / model.name
    ctx = PassContext(work_dir=tmp_path / "w", calibration_files=files)
    if conv_only_in_subgraphs(model):
        # onnxruntime's static quantizer does not enter If branches: a clear failure, never
        # the float model published under an INT8 name.
        with pytest.raises(PassError) as err:
            OnnxInt8StaticPass().run(model, static_cfg(), out, ctx)
        assert err.value.reason is Reason.ConversionFailed
        assert "subgraphs" in str(err.value) and "mode: dynamic" in str(err.value)
        assert not out.exists()
        return
    result = OnnxInt8StaticPass().run(model, static_cfg(), out, ctx)
    check_runs_like_fp32(model, out)
    main, _ = ops_by_scope(out)
    assert result.details["calibration"] == {"method": "MinMax", "samples": 3, "available": 3}
    assert sum(op in QDQ_OPS for op in main) == result.details["quantizedNodes"] > 0
    assert all(w.dtype == np.int8 for w in int8_weights(out).values())


def test_static_qoperator_entropy_and_uint8_activations(tmp_path: Path) -> None:
    model = next(p for p in VARIANTS if p.name == "silero_vad_16k_op15.onnx")
    files = write_calibration(model, tmp_path / "calib", count=4)
    calibration = {"uri": "file:///calib/", "samples": 2, "calibrateMethod": "Entropy"}
    config = cfg(
        mode="static", quantFormat="QOperator", activationType="QUInt8", calibration=calibration
    )
    ctx = PassContext(work_dir=tmp_path / "w", calibration_files=list(reversed(files)))
    result = OnnxInt8StaticPass().run(model, config, tmp_path / "q.onnx", ctx)
    main, _ = ops_by_scope(result.output)
    assert main.count("QLinearConv") == 6 and "Conv" not in main
    assert result.details["calibration"] == {"method": "Entropy", "samples": 2, "available": 4}
    check_runs_like_fp32(model, result.output)


def test_enable_subgraph_is_what_reaches_silero_weights(tmp_path: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    from kquant_job.passes.int8_prepare import prepare

    model = next(p for p in VARIANTS if p.name == "silero_vad.onnx")
    prepared = prepare(model, tmp_path / "w")
    plain = tmp_path / "plain.onnx"
    quantize_dynamic(prepared.path, plain, extra_options={"EnableSubgraph": False})
    main, inner = ops_by_scope(plain)
    assert not INTEGER_OPS & {*main, *inner}  # nothing quantized without EnableSubgraph
    # With EnableSubgraph (set by the pass) both branches are quantized; a node inside a
    # branch can be excluded by name.
    stft = "If_0_then_branch__Inline_0__/stft/Conv"
    config = cfg(nodesToExclude=[stft])
    result = OnnxInt8DynamicPass().run(model, config, tmp_path / "q.onnx", PassContext(tmp_path))
    main, inner = ops_by_scope(result.output)
    assert inner.count("ConvInteger") == 11 and inner.count("DynamicQuantizeLSTM") == 4
    quantized = onnx.load(str(result.output))
    assert [n.op_type for _, n in iter_nodes(quantized.graph) if n.name == stft] == ["Conv"]
    assert result.details["quantizedNodesInSubgraphs"] == result.details["quantizedNodes"]


def test_per_channel_reduce_range_weight_type_and_exclusions(tmp_path: Path) -> None:
    model = next(p for p in VARIANTS if p.name == "silero_vad_16k_op15.onnx")

    def run(name: str, **kw: object) -> tuple[Path, dict]:
        r = OnnxInt8DynamicPass().run(model, cfg(**kw), tmp_path / name, PassContext(tmp_path))
        return r.output, r.details

    def scales(path: Path) -> list[int]:
        model_proto = onnx.load(str(path))
        names = {f"{w}_scale" for w in int8_weights(path)} | {
            f"{w.removesuffix('_quantized')}_scale" for w in int8_weights(path)
        }
        return [
            int(np.prod(t.dims))
            for g in iter_graphs(model_proto.graph)
            for t in g.initializer
            if t.name in names
        ]

    plain, _ = run("plain.onnx")
    per_channel, _ = run("pc.onnx", perChannel=True)
    assert max(scales(plain)) == 1 and max(scales(per_channel)) > 1
    assert max(np.abs(w.astype(int)).max() for w in int8_weights(plain).values()) == 127
    reduced, _ = run("rr.onnx", reduceRange=True)
    assert max(np.abs(w.astype(int)).max() for w in int8_weights(reduced).values()) <= 64
    unsigned, _ = run("u8.onnx", weightType="QUInt8")
    weights = int8_weights(unsigned)
    conv = [n.input[1] for n in onnx.load(str(unsigned)).graph.node if n.op_type == "ConvInteger"]
    assert len(conv) == 6 and all(weights[w].dtype == np.uint8 for w in conv)
    # onnxruntime's DynamicQuantizeLSTM takes int8 weights whatever weightType says.
    excluded, details = run("ex.onnx", nodesToExclude=["/model/stft/Conv", "no/such/node"])
    main, _ = ops_by_scope(excluded)
    assert main.count("ConvInteger") == ops_by_scope(plain)[0].count("ConvInteger") - 1 == 5
    stft = next(n for n in onnx.load(str(excluded)).graph.node if n.name == "/model/stft/Conv")
    assert stft.op_type == "Conv"
    assert details["warnings"] == ["nodesToExclude: no node named 'no/such/node' in the model"]
    lstm_only, _ = run("lstm.onnx", opTypesToQuantize=["LSTM"])
    main, inner = ops_by_scope(lstm_only)
    assert "ConvInteger" not in main and inner.count("DynamicQuantizeLSTM") == 2


def speech_probe(model: Path, tolerance: Tolerance) -> Reference:
    """The validation probe (kquant_job.validate) on 8 streamed speech frames."""
    feeds = silero_feeds(model, 24, 8)
    return Reference(
        model,
        feeds,
        ValidationConfig(feedback={"stateN": "state"}),
        tolerance,
        ["CPUExecutionProvider"],
    )


def test_dynamic_fallback_ladder_ends_with_conv_left_float(tmp_path: Path) -> None:
    model = next(p for p in VARIANTS if p.name == "silero_vad_16k_op15.onnx")
    probe = speech_probe(model, Tolerance(maxAbsError=0.1, minCosineSimilarity=0.98)).probe
    ctx = PassContext(work_dir=tmp_path / "w", probe=probe)
    result = OnnxInt8DynamicPass().run(model, cfg(), tmp_path / "q.onnx", ctx)
    attempts = result.details["attempts"]
    labels = ["requested", "perChannel", "denseOpsOnly", "convWeightsInt8"]
    assert [a["attempt"] for a in attempts] == labels
    # Conv weights stored INT8 (computed in float) move the speech probability by 0.19
    assert [a["probe"]["ok"] for a in attempts] == [False, False, True, False]
    assert attempts[2]["opTypesToQuantize"] == ["LSTM"] and attempts[2]["perChannel"]
    assert attempts[3]["weightOnlyOpTypes"] == ["Conv"] and attempts[3]["weightOnlyLayers"] > 0
    assert result.details["probePassed"] is True
    assert result.details["chosenAttempt"] == "denseOpsOnly"
    assert result.details["weightOnlyLayers"] == 0
    main, inner = ops_by_scope(result.output)
    assert "ConvInteger" not in main and "DynamicQuantizeLSTM" in inner


def test_ladder_without_a_pass_returns_the_last_candidate(tmp_path: Path) -> None:
    model = next(p for p in VARIANTS if p.name == "silero_vad_16k_op15.onnx")
    probe = speech_probe(model, Tolerance(maxAbsError=1e-7)).probe
    files = write_calibration(model, tmp_path / "calib")
    ctx = PassContext(work_dir=tmp_path / "w", probe=probe, calibration_files=files)
    result = OnnxInt8StaticPass().run(model, static_cfg(), tmp_path / "q.onnx", ctx)
    assert result.details["probePassed"] is False
    # Static QDQ has no LSTM quantizer, so no dense-only step exists for this model.
    assert [a["attempt"] for a in result.details["attempts"]] == ["requested", "perChannel"]
    assert result.output.exists() and not list(tmp_path.glob("*.tmp"))


def _conv_opset11(path: Path) -> Path:
    """Two 3x3 convolutions (8 channels, random weights) in an opset 11 graph, as PP-OCR's
    exports are: a per-channel QDQ model of it does not load."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w2")
    b = numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b")
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w1", "b"], ["h"], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["h"], ["r"]),
        onnx.helper.make_node("Conv", ["r", "w2", "b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = onnx.helper.make_graph(
        nodes, "convs",
        [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        [w1, w2, b],
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.save(model, path)
    return path


def test_static_qdq_below_opset_13_makes_no_per_channel_attempt(tmp_path: Path) -> None:
    """Every per-channel QDQ candidate of an opset 11 model failed to load in onnxruntime
    (DequantizeLinear's axis came in opset 13): the ladder spent attempts on models that
    could not exist. Now it skips them and says why; asking for per-channel fails clearly."""
    model = _conv_opset11(tmp_path / "convs.onnx")
    rng = np.random.default_rng(1)
    files = []
    for i in range(3):
        files.append(tmp_path / f"c{i}.npz")
        np.savez(files[-1], x=rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32))
    feed = {"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)}
    tight = Reference(model, [feed], ValidationConfig(), Tolerance(maxAbsError=1e-9),
                      ["CPUExecutionProvider"])  # fmt: skip
    ctx = PassContext(work_dir=tmp_path / "w", probe=tight.probe, calibration_files=files)
    result = OnnxInt8StaticPass().run(model, static_cfg(), tmp_path / "q.onnx", ctx)
    attempts = result.details["attempts"]
    assert "perChannel" not in [a["attempt"] for a in attempts]
    assert all("error" not in a for a in attempts), attempts  # every candidate loaded
    assert any("opset 11" in w for w in result.details["warnings"])
    with pytest.raises(PassError) as info:
        OnnxInt8StaticPass().run(model, static_cfg(perChannel=True), tmp_path / "p.onnx", ctx)
    assert info.value.reason is Reason.ConversionFailed and "opset 13" in str(info.value)
