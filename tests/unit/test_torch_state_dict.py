"""FP16/BF16 casts of PyTorch checkpoints and safetensors files, on real modules' weights:
what is cast, kept and preserved, the container format, safe loading (a hostile pickle is
refused and nothing runs), GPU-saved checkpoints, and tensor validation (overflow fails
unless the tensor is kept FP32)."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import silero_dir
from safetensors import safe_open
from safetensors.torch import save_file
from torch_models import (
    TinyFlow,
    TinyLLM,
    _CreatesFile,
    gpu_checkpoint,
    hostile_checkpoint,
    save_state_dict,
    trained_bn,
)

from kquant_api import ModelFormat, QuantizationConfig, Reason
from kquant_job.errors import PassError
from kquant_job.passes import PassContext
from kquant_job.passes.safetensors_cast import SafetensorsCastPass
from kquant_job.passes.torch_common import keep_pattern, load_checkpoint
from kquant_job.passes.torch_state_dict import TorchStateDictPass
from kquant_job.validate.tensors import TensorValidator, compare_tensor

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit in 2.13
FP16 = QuantizationConfig(precision="fp16")


def convert(src: Path, tmp_path: Path, config: QuantizationConfig = FP16) -> dict:
    out = tmp_path / f"out_{src.name}"
    result = TorchStateDictPass().run(src, config, out, PassContext(tmp_path))
    assert result.output == out
    return result.details


def load(path: Path):
    return torch.load(path, weights_only=True, map_location="cpu")


def test_nested_checkpoint_cast_keeps_ints_stats_entries_and_tying(tmp_path):
    torch.manual_seed(0)
    llm, flow = TinyLLM(), trained_bn(TinyFlow())
    step = torch.tensor(7)
    checkpoint = {
        "model": llm.state_dict(keep_vars=False),
        "flow": flow.state_dict(),
        "epoch": 3,
        "config": {"lr": 1e-3, "name": "cosyvoice", "betas": (0.9, 0.98)},
        "step": step,
        "history": [torch.ones(2, dtype=torch.float64), "note"],
    }
    src = tmp_path / "ckpt.pt"
    torch.save(checkpoint, src)
    details = convert(src, tmp_path)
    out = load(tmp_path / "out_ckpt.pt")

    assert details["container"] == "zip" and zipfile.is_zipfile(tmp_path / "out_ckpt.pt")
    assert (out["epoch"], out["config"]) == (3, checkpoint["config"])
    assert out["history"][1] == "note" and out["history"][0].dtype == torch.float16
    assert out["step"].dtype == torch.int64 and int(out["step"]) == 7
    for name, before in llm.state_dict().items():
        after = out["model"][name]
        assert after.dtype == torch.float16, name
        assert torch.equal(after, before.half())
    # tied embedding / LM head: still one storage, written once
    emb, head = out["model"]["embed.weight"], out["model"]["head.weight"]
    assert emb.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    assert details["sharedTensors"] == 1
    # batch norm: statistics kept FP32 by default, counter untouched, weight cast
    assert out["flow"]["bn.running_var"].dtype == torch.float32
    assert torch.equal(out["flow"]["bn.running_var"], flow.bn.running_var)
    assert out["flow"]["bn.num_batches_tracked"].dtype == torch.int64
    assert out["flow"]["bn.weight"].dtype == torch.float16
    kept = {k["name"] for k in details["kept"]}
    assert kept == {"flow.bn.running_mean", "flow.bn.running_var"}
    assert details["untouchedByDtype"] == {"int64": 2}
    # the state dict's version metadata (used by load_state_dict) survives
    assert out["flow"]._metadata == flow.state_dict()._metadata
    fresh = TinyFlow()
    fresh.load_state_dict(out["flow"])
    size = (tmp_path / "out_ckpt.pt").stat().st_size
    assert size < 0.6 * src.stat().st_size


def test_legacy_container_stays_legacy_and_bf16(tmp_path):
    src = save_state_dict(trained_bn(TinyFlow()), tmp_path / "flow.pt", legacy=True)
    assert not zipfile.is_zipfile(src)
    details = convert(src, tmp_path, QuantizationConfig(precision="bf16"))
    out_path = tmp_path / "out_flow.pt"
    assert details["container"] == "legacy" and not zipfile.is_zipfile(out_path)
    out = load(out_path)
    assert out["conv.weight"].dtype == torch.bfloat16
    assert out["bn.running_mean"].dtype == torch.float32


def test_keep_fp32_patterns_match_dotted_suffixes(tmp_path):
    src = tmp_path / "nested.pt"
    torch.save({"state_dict": trained_bn(TinyFlow()).state_dict()}, src)
    details = convert(src, tmp_path, QuantizationConfig(precision="fp16", keepFp32=["gru.*"]))
    out = load(tmp_path / "out_nested.pt")["state_dict"]
    assert out["gru.weight_ih_l0"].dtype == torch.float32  # 'gru.*' matches state_dict.gru.*
    assert out["bn.running_var"].dtype == torch.float16  # explicit list replaces the default
    assert {k["pattern"] for k in details["kept"]} == {"gru.*"}
    assert keep_pattern("a.b.running_var", ["*.running_var"]) == "*.running_var"
    assert keep_pattern("running_var", ["*.running_var"]) is None
    assert keep_pattern("model.encoder.0.weight", ["encoder.*", "x"]) == "encoder.*"


def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    src = hostile_checkpoint(tmp_path / "model.pt", marker)
    # the file really executes code when loaded unsafely (so this test can fail)
    torch.load(src, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(PassError) as err:
        convert(src, tmp_path)
    assert err.value.reason is Reason.UnsafeModel
    assert "weights_only=True" in str(err.value)
    assert "Unsupported global: GLOBAL io.open" in str(err.value)
    assert not marker.exists() and not (tmp_path / "out_model.pt").exists()
    # a bare pickle stream (no torch container at all) is refused the same way
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"x": _CreatesFile(marker)}, protocol=2))
    with pytest.raises(PassError) as err:
        convert(raw, tmp_path)
    assert err.value.reason is Reason.UnsafeModel
    assert "GLOBAL io.open" in str(err.value) and "PyTorch 2.6" not in str(err.value)
    assert not marker.exists()
    # protocol 4 (pickle's default): torch names the opcode on the line after "error:", which
    # the reason left out ("WeightsUnpickler error:" and nothing: hostile-input trial)
    raw.write_bytes(pickle.dumps({"x": _CreatesFile(marker)}, protocol=4))
    with pytest.raises(PassError) as err:
        convert(raw, tmp_path)
    assert err.value.reason is Reason.UnsafeModel
    assert "(Unsupported operand 149)" in str(err.value), err.value
    assert not marker.exists()


def test_gpu_saved_checkpoint_loads_on_cpu(tmp_path):
    src = gpu_checkpoint(tmp_path / "gpu.pt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(src, weights_only=True)  # it really names a CUDA device
    details = convert(src, tmp_path)
    out = load(tmp_path / "out_gpu.pt")
    assert out["0.weight"].device.type == "cpu" and out["0.weight"].dtype == torch.float16
    assert details["tensorsCast"] == 4


def test_corrupt_checkpoint_is_classified(tmp_path):
    src = save_state_dict(TinyFlow(), tmp_path / "flow.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(PassError) as err:
        load_checkpoint(truncated, "truncated.pt")
    assert err.value.reason is Reason.CorruptModel
    assert "truncated.pt" in str(err.value)


def test_missing_torch_is_unsupported_format():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from kquant_job.passes.torch_common import require_torch\n"
        "from kquant_job.errors import PassError\n"
        "try:\n    require_torch()\nexcept PassError as e:\n"
        "    print(e.reason.value, '|', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("UnsupportedFormat |") and "install torch" in out.stdout


# --- safetensors -------------------------------------------------------------------------------


def test_safetensors_cast_keeps_metadata_and_kept_tensors(tmp_path):
    tensors = {
        "conv.weight": torch.randn(8, 4, 3),
        "bn.running_var": torch.rand(8) * 1e6,  # above FP16's range: the default keeps it
        "ids": torch.arange(5),
    }
    src = tmp_path / "model.safetensors"
    save_file(tensors, str(src), metadata={"format": "pt", "source": "kquant-test"})
    out = tmp_path / "out.safetensors"
    result = SafetensorsCastPass().run(src, FP16, out, PassContext(tmp_path))
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "source": "kquant-test"}
        assert fh.get_tensor("conv.weight").dtype == torch.float16
        assert torch.equal(fh.get_tensor("bn.running_var"), tensors["bn.running_var"])
        assert torch.equal(fh.get_tensor("ids"), tensors["ids"])
    assert result.details["tensorsCast"] == 1 and result.details["keptCount"] == 1
    outcome = TensorValidator(src, ModelFormat.safetensors).validate(out)
    assert outcome.passed, outcome.violations


def test_a_huge_metadata_header_is_kept_in_the_file_and_cut_in_the_report(tmp_path):
    """A header of 3 MB of text (safetensors allows 100 MB): the converted file keeps it
    whole, the report shows the first entries cut to 256 characters (before: all of it, and
    a 90 MB header made the stage's outcome too large: InternalError)."""
    for n, meta in enumerate(({"notes": "x" * 3_000_000}, {f"k{i}": str(i) for i in range(100)})):
        src = tmp_path / f"model{n}.safetensors"
        save_file({"w": torch.randn(4, 4)}, str(src), metadata=meta)
        out = tmp_path / f"out{n}.safetensors"
        details = SafetensorsCastPass().run(src, FP16, out, PassContext(tmp_path)).details
        with safe_open(str(out), "pt") as fh:
            assert fh.metadata() == meta
        shown = details["metadata"]
        assert len(shown) == min(64, len(meta))
        size = sum(len(k) + len(v) for k, v in meta.items())  # ASCII: characters are bytes
        assert details["metadataTruncated"] == {"entries": len(meta), "bytes": size}
        assert len(json.dumps(details)) < 30_000
    assert all(meta[k] == v for k, v in shown.items())  # short entries shown as they are
    first = (
        SafetensorsCastPass()
        .run(
            tmp_path / "model0.safetensors",
            FP16,
            tmp_path / "again.safetensors",
            PassContext(tmp_path),
        )
        .details["metadata"]
    )
    assert len(first["notes"]) == 256 and first["notes"].endswith("...")


def test_silero_safetensors_bf16_validates_as_tensors(tmp_path):
    src = silero_dir() / "silero_vad_16k.safetensors"
    out = tmp_path / "vad.safetensors"
    SafetensorsCastPass().run(src, QuantizationConfig(precision="bf16"), out, PassContext(tmp_path))
    outcome = TensorValidator(src, ModelFormat.safetensors).validate(out)
    report = outcome.to_report()
    assert outcome.passed and report["tensors"] == report["tensorsCast"] == 15
    assert outcome.summary().kind == "tensors"
    assert 0 < report["maxRelError"] <= 2**-8  # bf16 rounding: half of 2^-7
    assert report["cosineSimilarity"] > 0.9999


def test_corrupt_safetensors_is_classified(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((silero_dir() / "silero_vad_16k.safetensors").read_bytes()[:4000])
    with pytest.raises(PassError) as err:
        SafetensorsCastPass().run(bad, FP16, tmp_path / "o.safetensors", PassContext(tmp_path))
    assert err.value.reason is Reason.CorruptModel


# --- tensor validation -------------------------------------------------------------------------


def test_overflow_fails_unless_kept_and_flush_to_zero_is_counted(tmp_path, caplog):
    weights = OrderedDict(
        big=torch.tensor([1.0, 7e4, -1e5, 65519.0]),  # 65519 rounds to 65504, not Inf
        tiny=torch.tensor([1e-9, 1e-3, 0.0]),
        steps=torch.tensor([3, 4]),
    )
    src = tmp_path / "w.pt"
    torch.save(weights, src)
    caplog.set_level(logging.INFO)
    convert(src, tmp_path)
    outcome = TensorValidator(src, ModelFormat.pytorch).validate(tmp_path / "out_w.pt")
    assert not outcome.passed
    (violation,) = outcome.violations
    assert "'big'" in violation and "2 value(s) overflow float16" in violation
    assert "keepFp32: ['big']" in violation
    report = outcome.to_report()
    assert report["overflowValues"] == 2 and report["flushToZeroValues"] == 1
    assert {m["name"] for m in report["flagged"]} == {"big", "tiny"}

    convert(src, tmp_path, QuantizationConfig(precision="fp16", keepFp32=["big"]))
    outcome = TensorValidator(src, ModelFormat.pytorch).validate(tmp_path / "out_w.pt")
    assert outcome.passed, outcome.violations


def test_tensor_metrics_measure_the_cast():
    a = torch.tensor([1.0, 2.0, 1e-9, -3.0])
    m = compare_tensor("t", a, a.half())
    assert m.flushToZero == 1 and m.overflow == 0
    assert m.maxAbsError == pytest.approx(float((a - a.half().float()).abs().max()))
    assert m.maxRelError < 2**-11 + 1e-12
    ints = compare_tensor("i", torch.arange(4), torch.tensor([0, 1, 2, 4]))
    assert ints.exact and ints.mismatches == 1


def test_same_input_and_spec_give_identical_bytes(tmp_path):
    from kquant_job.passes.torch_script import TorchScriptPass

    llm = save_state_dict(TinyLLM(), tmp_path / "llm.pt")
    cases = [
        (TorchStateDictPass(), llm),
        (SafetensorsCastPass(), silero_dir() / "silero_vad_16k.safetensors"),
        (TorchScriptPass(), silero_dir() / "silero_vad.jit"),
    ]
    for pass_, src in cases:
        outputs = []
        for run in ("a", "b"):
            out = tmp_path / run / pass_.name / src.name
            out.parent.mkdir(parents=True)
            pass_.run(src, FP16, out, PassContext(tmp_path))
            outputs.append(out.read_bytes())
        assert outputs[0] == outputs[1], pass_.name
