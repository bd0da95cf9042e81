"""TorchScript passes: FP16/BF16 with run-time casts (Silero VAD's silero_vad.jit, which a
plain ``.half()`` breaks, and scripted/traced modules with BatchNorm, LSTM, GRU, embeddings),
INT8 dynamic (Linear layers, CPU), and TorchScript validation (inputs from the spec or
.npz files, state threaded as the package does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SPEECH_WAV, silero_dir
from torch import nn

from kquant_api import QuantizationConfig, Reason, Tolerance, ValidationConfig
from kquant_job.audio import frame_feeds, read_wav, write_feeds
from kquant_job.errors import InvalidSpec, PassError
from kquant_job.passes import PassContext
from kquant_job.passes.torch_int8_dynamic import TorchInt8DynamicPass
from kquant_job.passes.torch_script import TorchScriptPass
from kquant_job.validate.torch_outputs import TorchScriptValidator, prepare_args

pytestmark = [  # torch 2.13 marks torch.jit deprecated; tracing warns about Python branches
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]
SILERO_JIT = silero_dir() / "silero_vad.jit"
TOL = Tolerance(maxMeanAbsError=1e-2, minCosineSimilarity=0.999)


def speech_frames(n: int) -> list[torch.Tensor]:
    samples, _ = read_wav(SPEECH_WAV)
    return [torch.from_numpy(samples[i * 512 : (i + 1) * 512].copy())[None] for i in range(n)]


def stream(module, frames, sr: int = 16000) -> torch.Tensor:
    module.reset_states()
    with torch.inference_mode():
        return torch.cat([module(f, sr) for f in frames])


@pytest.mark.parametrize(
    ("precision", "dtype", "bound"),
    [("fp16", torch.float16, 0.05), ("bf16", torch.bfloat16, 0.3)],
)
def test_silero_jit_converts_and_streams_like_the_original(tmp_path, precision, dtype, bound):
    original = torch.jit.load(str(SILERO_JIT))
    half = torch.jit.load(str(SILERO_JIT)).to(dtype)
    with pytest.raises(RuntimeError, match=r"should be the same|expected scalar type"):
        stream(half, speech_frames(2))  # a plain cast breaks: the code makes FP32 tensors

    out = tmp_path / f"vad_{precision}.jit"
    config = QuantizationConfig(precision=precision)
    details = TorchScriptPass().run(SILERO_JIT, config, out, PassContext(tmp_path)).details
    assert details["tensorsCast"] == 30 and details["weightCasts"] > 0
    assert "reset_states" in details["methods"]
    converted = torch.jit.load(str(out))
    assert {p.dtype for p in converted.parameters()} == {dtype}
    assert out.stat().st_size < 0.6 * SILERO_JIT.stat().st_size

    frames = speech_frames(120)
    a, b = stream(original, frames), stream(converted, frames)
    assert b.dtype == torch.float32  # outputs keep their type
    assert float((a - b).abs().max()) < bound
    assert float((a - b).abs().mean()) < bound / 10
    # the 8 kHz branch and the state reset still work
    converted.reset_states()
    with torch.inference_mode():
        assert converted(torch.zeros(1, 256), 8000).shape == (1, 1)


class Tagger(nn.Module):
    """Embedding + conv + BatchNorm (statistics beyond FP16's range) + LSTM + GRU + heads,
    returning float and integer outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.norm = nn.LayerNorm(16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, 5)
        with torch.no_grad():
            self.bn.running_var.uniform_(1e5, 2e5)
            self.bn.running_mean.uniform_(-100, 100)

    def forward(self, tokens: torch.Tensor):
        x = self.emb(tokens)
        y = self.bn(self.conv(x.transpose(1, 2))).transpose(1, 2)
        y, _ = self.lstm(self.norm(y + x))
        y, h = self.gru(y)
        logits = self.head(y)
        return logits, h, logits.argmax(-1)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_scripted_and_traced_modules_keep_bn_fp32_and_io_types(tmp_path, how):
    torch.manual_seed(0)
    model = Tagger().eval()
    tokens = torch.randint(0, 40, (2, 9))
    module = torch.jit.script(model) if how == "script" else torch.jit.trace(model, tokens)
    src = tmp_path / "tagger.pt"
    torch.jit.save(module, str(src))
    out = tmp_path / "tagger_fp16.pt"
    details = TorchScriptPass().run(src, QuantizationConfig(precision="fp16"), out,
                                    PassContext(tmp_path)).details  # fmt: skip
    why = {k["name"]: k["why"] for k in details["kept"]}
    assert why["bn.running_var"] == "keepFp32 '*.running_var'"
    assert why["bn.weight"].startswith("module of bn.")  # one dtype per module
    converted = torch.jit.load(str(out))
    dtypes = {n: p.dtype for n, p in converted.named_parameters()}
    assert dtypes["bn.weight"] == torch.float32 and dtypes["lstm.weight_ih_l0"] == torch.float16
    with torch.inference_mode():
        (la, ha, _), (lb, hb, ib) = module(tokens), converted(tokens)
    assert lb.dtype == hb.dtype == torch.float32 and ib.dtype == torch.int64
    assert float((la - lb).abs().max()) < 0.05 and float((ha - hb).abs().max()) < 0.05
    assert torch.isfinite(lb).all()


def test_validator_finds_arguments_honours_overrides_and_threads_state(tmp_path):
    found = TorchScriptValidator(SILERO_JIT, ValidationConfig(samples=2), TOL, [])
    assert found.chosen["inputs"] == {"x": "[1, 512] speech (16 kHz clip)", "sr": "value 16000"}
    cfg = ValidationConfig(inputs={"sr": {"value": 8000}}, samples=2)
    eight_khz = TorchScriptValidator(SILERO_JIT, cfg, TOL, []).chosen["inputs"]["x"]
    assert eight_khz.startswith("[1, 256]")  # the 8 kHz model's window, found at that rate
    bad = ValidationConfig(inputs={"x": {"shape": [1, 300]}, "sr": {"value": 16000}}, samples=2)
    with pytest.raises(InvalidSpec, match=r"runs on none of the 1 argument sets") as info:
        TorchScriptValidator(SILERO_JIT, bad, TOL, [])
    assert "x: {shape: [1, 300]}" in str(info.value)
    with pytest.raises(InvalidSpec, match=r"spec\.validation\.inputs\.y: forward has no such"):
        TorchScriptValidator(SILERO_JIT, ValidationConfig(inputs={"y": {"value": 1}}), TOL, [])

    samples, _ = read_wav(SPEECH_WAV)
    feeds = frame_feeds(samples, 512, "x", extra={"sr": np.array(16000, np.int64)})[:40]
    files = write_feeds(feeds, tmp_path / "data")
    cfg = ValidationConfig(samples=40, latencyRuns=2, warmupRuns=1)
    validator = TorchScriptValidator(SILERO_JIT, cfg, TOL, files)
    args, chosen = prepare_args(validator.module, cfg, files)
    assert chosen is None  # given, not found
    assert isinstance(args[0]["sr"], int) and tuple(args[0]["x"].shape) == (1, 512)
    out = tmp_path / "vad.jit"
    TorchScriptPass().run(SILERO_JIT, QuantizationConfig(precision="fp16"), out,
                          PassContext(tmp_path))  # fmt: skip
    outcome = validator.validate(out)
    assert outcome.passed, outcome.violations
    assert outcome.samples == 40 and set(outcome.metrics) == {"output"}
    assert 0 < outcome.metrics["output"].maxAbsError < 0.05
    assert outcome.latency_ms and outcome.latency_ms["quantized"] > 0
    # the original itself is a perfect match; a wrong model is caught
    assert validator.validate(SILERO_JIT).metrics["output"].maxAbsError == 0.0
    broken = tmp_path / "broken.jit"
    broken.write_bytes(b"not a module")
    failed = validator.validate(broken)
    assert not failed.passed and "converted module failed" in failed.violations[0]


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_dynamic_quantizes_linear_layers(tmp_path, per_channel):
    torch.manual_seed(0)
    src = tmp_path / "clf.pt"
    torch.jit.save(torch.jit.script(Classifier().eval()), str(src))
    out = tmp_path / "clf_int8.pt"
    config = QuantizationConfig(precision="int8", perChannel=per_channel)
    details = TorchInt8DynamicPass().run(src, config, out, PassContext(tmp_path)).details
    assert (details["linearQuantized"], details["linearTotal"]) == (2, 2)
    assert details["device"] == "cpu" and details["perChannel"] is per_channel
    quantized = torch.jit.load(str(out))
    assert quantized.inlined_graph.findAllNodes("quantized::linear_dynamic")
    cfg = ValidationConfig(inputs={"x": {"shape": [8, 32]}}, samples=4, latencyRuns=2)
    outcome = TorchScriptValidator(
        src, cfg, Tolerance(maxMeanAbsError=5e-2, minCosineSimilarity=0.98), [], cpu_only=True
    ).validate(out)
    assert outcome.passed, outcome.violations
    assert outcome.device == "cpu"
    assert outcome.metrics["output"].maxAbsError > 0


def test_int8_dynamic_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(PassError, match="no Linear layer") as err:
        TorchInt8DynamicPass().run(SILERO_JIT, QuantizationConfig(precision="int8"),
                                   tmp_path / "o.jit", PassContext(tmp_path))  # fmt: skip
    assert err.value.reason is Reason.UnsupportedFormat
    with pytest.raises(PassError, match="weightType: QUInt8"):
        TorchInt8DynamicPass().run(SILERO_JIT, QuantizationConfig(precision="int8",
                                   weightType="QUInt8"), tmp_path / "o.jit",
                                   PassContext(tmp_path))  # fmt: skip


def test_corrupt_torchscript_is_classified(tmp_path):
    bad = tmp_path / "bad.jit"
    bad.write_bytes(SILERO_JIT.read_bytes()[:20000])
    with pytest.raises(PassError) as err:
        TorchScriptPass().run(bad, QuantizationConfig(precision="fp16"), tmp_path / "o.jit",
                              PassContext(tmp_path))  # fmt: skip
    assert err.value.reason is Reason.CorruptModel


class _Strings(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return x * 2, "speech"


class _ManyDims(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape([1] * 70)


@pytest.mark.parametrize(
    ("module", "words"),
    [(_Strings, "'output_1' of the module (str)"), (_ManyDims, "'output' of the module (Tensor)")],
)
def test_an_output_that_is_no_numeric_tensor_is_an_unsupported_format(tmp_path, module, words):
    """Trial: a str output and a 70-dimension tensor (numpy holds 64) were InternalErrors."""
    path = tmp_path / "m.pt"
    torch.jit.script(module()).save(str(path))
    cfg = ValidationConfig(inputs={"x": {"shape": [1]}}, samples=1)
    with pytest.raises(PassError) as info:
        TorchScriptValidator(path, cfg, TOL, [], cpu_only=True)
    assert info.value.reason is Reason.UnsupportedFormat
    assert words in str(info.value) and "numeric tensor outputs only" in str(info.value)
