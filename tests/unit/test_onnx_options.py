"""The users' onnxruntime recipes: extraOptions passed through and checked, pre-processing
selectable, opBlockList extending the defaults, and names that match nothing refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import silero_dir
from corpus import build_corpus
from onnx import numpy_helper

from kquant_api import Int8Mode, QuantizationConfig, QuantizationJob
from kquant_job.errors import InvalidSpec, PassError
from kquant_job.passes import PassContext
from kquant_job.passes.onnx_int8_dynamic import OnnxInt8DynamicPass
from kquant_job.passes.onnx_options import check_names, extra_option_keys
from kquant_job.stage import StageInput, convert_and_validate


def int8(**kw: object) -> QuantizationConfig:
    return QuantizationConfig.model_validate({"precision": "int8", **kw})


def test_extra_options_reach_onnxruntime_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    bert = build_corpus()["bert_tiny"].path
    out = tmp_path / "sym.onnx"
    result = OnnxInt8DynamicPass().run(
        bert, int8(extraOptions={"WeightSymmetric": False}), out, PassContext(tmp_path / "a")
    )
    assert result.details["extraOptions"] == {"WeightSymmetric": False}
    zero_points = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(out)).graph.initializer
        if t.name.endswith("zero_point") and t.data_type == onnx.TensorProto.INT8
    ]
    assert any(np.any(z != 0) for z in zero_points)  # asymmetric weights: nonzero points
    with pytest.raises(InvalidSpec) as info:
        OnnxInt8DynamicPass().run(
            bert, int8(extraOptions={"ExtraSymmetric": True}), tmp_path / "x.onnx",
            PassContext(tmp_path / "b"),
        )  # fmt: skip
    assert "spec.quantization.extraOptions.ExtraSymmetric" in str(info.value)
    assert "WeightSymmetric" in str(info.value)  # says what onnxruntime knows
    assert {"CalibMovingAverage", "SmoothQuant"} <= extra_option_keys(Int8Mode.static)
    assert "CalibMovingAverage" not in extra_option_keys(Int8Mode.dynamic)


def test_preprocessing_is_selectable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bert = build_corpus()["bert_tiny"].path
    run = OnnxInt8DynamicPass().run
    never = run(bert, int8(preprocess="never"), tmp_path / "n.onnx", PassContext(tmp_path / "n"))
    assert never.details["preprocess"] == "skipped (never)"
    auto = run(bert, int8(), tmp_path / "a.onnx", PassContext(tmp_path / "a"))
    # its position tables are Gathers at constant indices, which pre-processing folds
    assert auto.details["preprocess"] == "applied"
    # auto: every weight an initializer, no Conv, nothing folded: pre-processing would change
    # nothing dynamic INT8 produces, so it is skipped, saying why
    lstm = build_corpus()["lstm_gru"].path
    kept = run(lstm, int8(), tmp_path / "k.onnx", PassContext(tmp_path / "k"))
    assert kept.details["preprocess"] == "applied"  # small: it costs milliseconds here
    import kquant_job.passes.int8_prep_need as need

    monkeypatch.setattr(need, "SKIP_FROM_BYTES", 0)  # judged as a large model
    skipped = run(lstm, int8(), tmp_path / "l.onnx", PassContext(tmp_path / "l"))
    assert skipped.details["preprocess"].startswith("skipped: no Conv, and every weight")
    applied = run(lstm, int8(preprocess="always"), tmp_path / "m.onnx", PassContext(tmp_path / "m"))
    assert applied.details["preprocess"] == "applied"
    quantized = {k: v for k, v in skipped.details.items() if k.startswith("quantized")}
    assert quantized == {k: applied.details[k] for k in quantized}
    assert quantized["quantizedNodes"] > 0
    # Silero's If branches make onnxruntime's symbolic shape inference fail: auto goes on
    # without it, always refuses
    silero = silero_dir() / "silero_vad.onnx"
    lenient = run(silero, int8(), tmp_path / "s.onnx", PassContext(tmp_path / "s"))
    assert "preprocessError" in lenient.details
    with pytest.raises(PassError) as info:
        run(silero, int8(preprocess="always"), tmp_path / "t.onnx", PassContext(tmp_path / "t"))
    assert info.value.reason.value == "ConversionFailed"
    assert "preprocess is always" in str(info.value)


def test_names_that_match_nothing_are_refused_naming_them() -> None:
    corpus = build_corpus()
    bert, cnn = corpus["bert_tiny"].path, corpus["cnn_upsample"].path
    fp16 = QuantizationConfig(precision="fp16", opBlockList=["Resize"])
    check_names(fp16, [bert, cnn])  # in one model of the job: enough
    with pytest.raises(InvalidSpec, match=r"opBlockList: op type 'Resize' occurs in no model"):
        check_names(fp16, [bert])
    typo = QuantizationConfig(precision="fp16", nodeBlockList=["/encoder/Softmaxx"])
    with pytest.raises(InvalidSpec, match=r"nodeBlockList: node '/encoder/Softmaxx'"):
        check_names(typo, [bert])
    with pytest.raises(InvalidSpec, match="opTypesToQuantize: op type 'Conv'"):
        check_names(int8(opTypesToQuantize=["Conv"]), [bert])
    with pytest.raises(InvalidSpec, match="nodesToExclude: node 'nope'"):
        check_names(int8(nodesToExclude=["nope"]), [bert])
    check_names(int8(opTypesToQuantize=["MatMul"]), [bert])


def test_the_job_refuses_a_typo_before_converting(tmp_path: Path) -> None:
    model = build_corpus()["bert_tiny"].path
    job = QuantizationJob.model_validate(
        {
            "apiVersion": "kquant.io/v1alpha1",
            "kind": "QuantizationJob",
            "spec": {
                "model": {"uri": f"file://{model}"},
                "output": {"uri": "file:///unused/"},
                "quantization": {"precision": "fp16", "opBlockList": ["LayerNormalisation"]},
            },
        }
    )
    io = StageInput(model, [], tmp_path, [], tmp_path, tmp_path / "staged", tmp_path / "s")
    with pytest.raises(InvalidSpec, match="LayerNormalisation"):
        convert_and_validate(job, io)
    assert not (tmp_path / "staged").exists()
