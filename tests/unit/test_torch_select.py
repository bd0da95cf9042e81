"""Which pass runs for which PyTorch format and precision, the spec rules of bf16 and
keepFp32, and the model-directory plan for PyTorch layouts (CosyVoice's hift.pt kept)."""

from __future__ import annotations

import pytest
import torch
from torch_models import TinyFlow, save_state_dict

from kquant_api import DEFAULT_TOLERANCE, ModelFormat, Precision, QuantizationConfig, Reason
from kquant_job.errors import InvalidSpec, PassError
from kquant_job.formats import plan_model
from kquant_job.manifest import parse_job
from kquant_job.passes import select_pass

F = ModelFormat


@pytest.mark.parametrize(
    ("fmt", "quantization", "expected"),
    [
        (F.pytorch, {"precision": "fp16"}, "torch-state-dict-cast"),
        (F.pytorch, {"precision": "bf16"}, "torch-state-dict-cast"),
        (F.torchscript, {"precision": "bf16"}, "torchscript-cast"),
        (F.torchscript, {"precision": "int8"}, "torch-int8-dynamic"),
        (F.safetensors, {"precision": "fp16"}, "safetensors-cast"),
        (F.onnx, {"precision": "fp16"}, "onnx-fp16"),
    ],
)
def test_passes_by_format_and_precision(fmt, quantization, expected):
    assert select_pass(fmt, QuantizationConfig(**quantization)).name.startswith(expected)


@pytest.mark.parametrize(
    ("fmt", "quantization", "words"),
    [
        (F.onnx, {"precision": "bf16"}, "bf16 applies to PyTorch formats"),
        (F.pytorch, {"precision": "int8"}, "nothing to quantize"),
        (F.safetensors, {"precision": "int8"}, "nothing to quantize"),
        (F.torchscript, {"precision": "int8", "mode": "static", "calibration": {"uri": "s3://b/c/"}},
         "int8 static for TorchScript"),
    ],
)  # fmt: skip
def test_what_no_pass_can_do_is_unsupported_with_a_reason(fmt, quantization, words):
    with pytest.raises(PassError, match=words) as err:
        select_pass(fmt, QuantizationConfig(**quantization))
    assert err.value.reason is Reason.UnsupportedFormat


def _job(**quantization) -> dict:
    return {
        "apiVersion": "kquant.io/v1alpha1",
        "kind": "QuantizationJob",
        "spec": {
            "model": {"uri": "s3://models/cosyvoice/"},
            "output": {"uri": "s3://models/cosyvoice-fp16/"},
            "quantization": quantization,
        },
    }


def test_spec_defaults_and_rules_for_bf16_and_keep_fp32():
    job = parse_job(_job(precision="bf16"))
    q = job.spec.quantization
    assert q.precision is Precision.bf16 and q.keep_fp32 == ["*.running_mean", "*.running_var"]
    assert job.spec.tolerance == DEFAULT_TOLERANCE[Precision.bf16]
    assert parse_job(_job(precision="fp16", keepFp32=[])).spec.quantization.keep_fp32 == []
    for bad, field in [
        ({"precision": "int8", "keepFp32": ["*.x"]}, "spec.quantization.keepFp32: fp16/bf16"),
        ({"precision": "bf16", "keepIoTypes": True}, "keepIoTypes: fp16 setting given with "
         "precision bf16"),
        ({"precision": "bf16", "perChannel": True}, "perChannel: int8 setting given with "
         "precision bf16"),
    ]:  # fmt: skip
        with pytest.raises(InvalidSpec, match=field):
            parse_job(_job(**bad))


def test_directory_plan_keeps_hift_unless_named(tmp_path):
    root = tmp_path / "CosyVoice2-0.5B"
    (root / "CosyVoice-BlankEN").mkdir(parents=True)
    for name in ("llm.pt", "flow.pt", "hift.pt"):
        save_state_dict(TinyFlow(), root / name)
    torch.save({"spk": {"embedding": torch.randn(4)}}, root / "spk2info.pt")
    (root / "cosyvoice.yaml").write_text("sample_rate: 24000\n")
    (root / "CosyVoice-BlankEN" / "config.json").write_text("{}")

    plan = plan_model(root)
    assert [m.rel for m in plan.models] == ["flow.pt", "llm.pt", "spk2info.pt"]
    assert list(plan.kept) == ["hift.pt"] and "hift.pt" in plan.copies
    assert "excluded by default" in plan.kept["hift.pt"] and "exclude: []" in plan.kept["hift.pt"]
    assert {"cosyvoice.yaml", "CosyVoice-BlankEN/config.json"} <= set(plan.copies)
    assert plan.warnings == []

    plan = plan_model(root, include=["llm.pt", "flow.pt"])
    assert [m.rel for m in plan.models] == ["flow.pt", "llm.pt"]
    assert sorted(plan.kept) == ["hift.pt", "spk2info.pt"]
    assert plan.kept["spk2info.pt"] == "matches no include pattern (llm.pt, flow.pt)"
    # the users' --quantize-hift habit, spelled include: it converts hift.pt alone, and says so
    narrow = plan_model(root, include=["hift.pt"])
    assert [m.rel for m in narrow.models] == ["hift.pt"]
    [warning] = narrow.warnings
    assert "flow.pt, llm.pt, spk2info.pt stay as they are" in warning
    assert "exclude: []" in warning
    assert plan_model(root, exclude=["flow.*"]).kept == {
        "flow.pt": "matches exclude pattern 'flow.*'"
    }
    assert [m.rel for m in plan_model(root, include=["*.pt"]).models] == [
        "flow.pt", "llm.pt", "spk2info.pt"]  # a wildcard does not name the vocoder  # fmt: skip
    assert "hift.pt" in [m.rel for m in plan_model(root, include=["llm.pt", "hift.pt"]).models]
    assert "hift.pt" in [m.rel for m in plan_model(root, exclude=[]).models]
    assert plan_model(root / "hift.pt").models[0].rel == "hift.pt"  # a single file: converted


def test_int4_on_a_pytorch_format_suggests_only_what_that_format_takes():
    """int4 on a state dict advised int8, which a state dict then refused."""
    int4 = QuantizationConfig(precision="int4")
    for fmt, int8_works in ((ModelFormat.pytorch, False), (ModelFormat.torchscript, True)):
        with pytest.raises(PassError) as info:
            select_pass(fmt, int4)
        assert ("int8" in str(info.value)) is int8_works, str(info.value)
        if int8_works:
            select_pass(fmt, QuantizationConfig(precision="int8"))  # what it advises exists
        else:
            with pytest.raises(PassError):
                select_pass(fmt, QuantizationConfig(precision="int8"))
