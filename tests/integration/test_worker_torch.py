"""PyTorch layouts end to end: the real ``kquant-job`` process against moto's S3 server.

- CosyVoice-like directory (llm.pt, flow.pt, hift.pt, spk2info.pt, cosyvoice.yaml and a
  sub-folder): state dicts cast, the vocoder kept FP32, everything else copied, layout
  mirrored, tensor validation reported;
- SenseVoice-like directory (model.pt + config.json, tokenizer.json, vocab.txt) in BF16;
- Silero VAD's silero_vad.jit validated on real speech frames (state threaded by the module
  itself), and its silero_vad_16k.safetensors;
- failures: a hostile pickle (UnsafeModel, nothing runs, nothing published), a weight beyond
  FP16's range (ValidationFailed, report only), INT8 of a bare state dict (UnsupportedFormat).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SPEECH_WAV, silero_dir
from safetensors import safe_open
from torch_models import (
    TinyFlow,
    TinyHiFT,
    TinyLLM,
    TinySenseVoice,
    hostile_checkpoint,
    save_state_dict,
    trained_bn,
)
from worker_helpers import (
    failure_report,
    get_bytes,
    manifest,
    published_keys,
    run_worker,
    upload_dir,
)

from kquant_job.audio import frame_feeds, read_wav, write_feeds

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit in 2.13
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SIDE = {
    "cosyvoice.yaml": b"sample_rate: 24000\nllm: !new:cosyvoice.llm.llm.Qwen2LM\n",
    "CosyVoice-BlankEN/config.json": b'{"model_type": "qwen2"}\n',
    "CosyVoice-BlankEN/merges.txt": b"#version: 0.2\n",
}


def load_pt(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), weights_only=True)


def report_of(client, bucket: str, prefix: str) -> dict:
    return json.loads(get_bytes(client, bucket, f"{prefix}report.json"))


@pytest.fixture
def client(s3_server):
    return s3_server.client()


def test_cosyvoice_directory_example(client, bucket, s3_server, worker_env, tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "CosyVoice2-0.5B"
    (src / "CosyVoice-BlankEN").mkdir(parents=True)
    save_state_dict(TinyLLM(), src / "llm.pt")
    save_state_dict(trained_bn(TinyFlow()), src / "flow.pt", legacy=True)
    save_state_dict(TinyHiFT(), src / "hift.pt")
    torch.save({"spk_a": {"embedding": torch.randn(1, 192)}}, src / "spk2info.pt")
    for rel, data in SIDE.items():
        (src / rel).write_bytes(data)
    upload_dir(client, bucket, "cosy/", src)

    # the example manifest as it is, pointed at this bucket and the moto server
    job = yaml.safe_load((EXAMPLES / "cosyvoice2-fp16.yaml").read_text())
    job["spec"]["model"]["uri"] = f"s3://{bucket}/cosy/"
    job["spec"]["output"]["uri"] = f"s3://{bucket}/cosy-fp16/"
    job["spec"]["storage"]["endpoint"] = s3_server.endpoint
    run = run_worker(job, tmp_path, worker_env)
    assert run.code == 0, run.log

    keys = published_keys(client, bucket, "cosy-fp16/")
    models = ["flow.pt", "hift.pt", "llm.pt", "spk2info.pt"]
    assert set(keys) == {*models, *SIDE, "report.json", "manifest.json"}  # mirrored, same names
    for rel, data in SIDE.items():
        assert get_bytes(client, bucket, f"cosy-fp16/{rel}") == data
    hift = get_bytes(client, bucket, "cosy-fp16/hift.pt")
    assert hift == (src / "hift.pt").read_bytes()  # the vocoder stays FP32, byte for byte
    llm = load_pt(get_bytes(client, bucket, "cosy-fp16/llm.pt"))
    assert {t.dtype for t in llm.values()} == {torch.float16}
    flow = load_pt(get_bytes(client, bucket, "cosy-fp16/flow.pt"))
    assert flow["gru.weight_hh_l0"].dtype == torch.float16
    assert flow["bn.running_var"].dtype == torch.float32
    assert flow["bn.num_batches_tracked"].dtype == torch.int64
    TinyFlow().load_state_dict(flow)  # loads into the model's code as before
    spk = load_pt(get_bytes(client, bucket, "cosy-fp16/spk2info.pt"))
    assert spk["spk_a"]["embedding"].dtype == torch.float16

    report = report_of(client, bucket, "cosy-fp16/")
    actions = {f["path"]: f["action"] for f in report["files"]}
    assert actions == {
        "llm.pt": "converted",
        "flow.pt": "converted",
        "spk2info.pt": "converted",
        "hift.pt": "kept",
        **dict.fromkeys(SIDE, "copied"),
    }
    why = {f["path"]: f.get("why") for f in report["files"]}
    assert "excluded by default" in why["hift.pt"] and why["llm.pt"] is None
    sizes = {f["path"]: f["bytes"] for f in report["files"]}
    assert sizes["hift.pt"] == (src / "hift.pt").stat().st_size
    assert sizes["llm.pt"] < 0.6 * (src / "llm.pt").stat().st_size
    by_path = {m["path"]: m for m in report["models"]}
    assert by_path["flow.pt"]["details"]["container"] == "legacy"
    assert by_path["llm.pt"]["details"]["sharedTensors"] == 1  # tied embedding / head
    for m in by_path.values():
        assert m["validation"]["kind"] == "tensors" and m["validation"]["passed"]
        assert m["validation"]["overflowValues"] == 0
    assert run.result["validation"]["kind"] == "tensors"
    assert run.result["quantizedBytes"] < run.result["originalBytes"]


def test_sensevoice_directory_bf16(client, bucket, s3_server, worker_env, tmp_path):
    src = tmp_path / "SenseVoiceSmall"
    src.mkdir()
    torch.manual_seed(1)
    save_state_dict(trained_bn(TinySenseVoice()), src / "model.pt")
    side = {
        "config.json": b'{"encoder": "SenseVoiceEncoderSmall"}\n',
        "tokenizer.json": b'{"model": {"type": "BPE"}}\n',
        "vocab.txt": "<blank>\n<s>\n你好\n".encode(),
    }
    for rel, data in side.items():
        (src / rel).write_bytes(data)
    upload_dir(client, bucket, "sv/", src)
    quantization = {"precision": "bf16", "keepFp32": ["*.running_*", "ctc.*"]}
    job = manifest(f"s3://{bucket}/sv/", f"s3://{bucket}/sv-bf16/", quantization,
                   endpoint=s3_server.endpoint)  # fmt: skip
    run = run_worker(job, tmp_path, worker_env)
    assert run.code == 0, run.log
    assert set(published_keys(client, bucket, "sv-bf16/")) == {
        "model.pt",
        *side,
        "report.json",
        "manifest.json",
    }
    state = load_pt(get_bytes(client, bucket, "sv-bf16/model.pt"))
    assert state["ctc.weight"].dtype == torch.float32
    assert state["subsample.1.running_var"].dtype == torch.float32
    assert state["encoder.layers.0.self_attn.in_proj_weight"].dtype == torch.bfloat16
    model = report_of(client, bucket, "sv-bf16/")["models"][0]
    assert model["details"]["keepFp32"] == ["*.running_*", "ctc.*"]
    assert {k["name"] for k in model["details"]["kept"]} == {
        "ctc.weight", "ctc.bias", "subsample.1.running_mean", "subsample.1.running_var"
    }  # fmt: skip


def test_silero_jit_on_speech_and_safetensors(client, bucket, s3_server, worker_env, tmp_path):
    data = silero_dir()
    client.upload_file(str(data / "silero_vad.jit"), bucket, "vad/silero_vad.jit")
    samples, _ = read_wav(SPEECH_WAV)
    feeds = frame_feeds(samples, 512, "x", extra={"sr": np.array(16000, np.int64)})[:64]
    upload_dir(client, bucket, "eval/", write_feeds(feeds, tmp_path / "eval")[0].parent)
    job = manifest(f"s3://{bucket}/vad/silero_vad.jit", f"s3://{bucket}/vad-fp16/",
                   {"precision": "fp16"}, endpoint=s3_server.endpoint,
                   validation={"dataUri": f"s3://{bucket}/eval/", "samples": 64})  # fmt: skip
    run = run_worker(job, tmp_path, worker_env)
    assert run.code == 0, run.log
    assert published_keys(client, bucket, "vad-fp16/") == [
        "manifest.json", "report.json", "silero_vad_fp16.jit"
    ]  # fmt: skip
    summary = run.result["validation"]
    assert summary["samples"] == 64 and "kind" not in summary  # outputs compared
    assert 0 < summary["maxAbsError"] < 0.05 and summary["cosineSimilarity"] > 0.999
    assert summary["latencyMs"]["quantized"] > 0
    report = report_of(client, bucket, "vad-fp16/")
    validation = report["models"][0]["validation"]
    assert validation["kind"] == "outputs" and validation["provider"] == "torch-cpu"
    module = torch.jit.load(io.BytesIO(get_bytes(client, bucket, "vad-fp16/silero_vad_fp16.jit")))
    module.reset_states()
    assert module(torch.from_numpy(feeds[0]["x"]), 16000).dtype == torch.float32

    client.upload_file(
        str(data / "silero_vad_16k.safetensors"), bucket, "st/silero_vad_16k.safetensors"
    )
    job = manifest(f"s3://{bucket}/st/silero_vad_16k.safetensors", f"s3://{bucket}/st-fp16/",
                   {"precision": "fp16"}, endpoint=s3_server.endpoint)  # fmt: skip
    run = run_worker(job, tmp_path, worker_env)
    assert run.code == 0, run.log
    out = tmp_path / "vad_fp16.safetensors"
    out.write_bytes(get_bytes(client, bucket, "st-fp16/silero_vad_16k_fp16.safetensors"))
    with safe_open(str(out), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float16}  # noqa: SIM118
    assert run.result["validation"] == {**run.result["validation"], "kind": "tensors"}


def test_hostile_pickle_is_refused_nothing_runs_nothing_published(
    client, bucket, s3_server, worker_env, tmp_path
):
    src = tmp_path / "evil"
    src.mkdir()
    marker = tmp_path / "pwned"
    hostile_checkpoint(src / "model.pt", marker)
    (src / "config.json").write_bytes(b"{}")
    upload_dir(client, bucket, "evil/", src)
    job = manifest(f"s3://{bucket}/evil/", f"s3://{bucket}/evil-fp16/", {"precision": "fp16"},
                   endpoint=s3_server.endpoint)  # fmt: skip
    run = run_worker(job, tmp_path, worker_env)
    assert run.code == 30, run.log
    assert run.result["reason"] == "UnsafeModel"
    assert "model.pt" in run.result["message"] and "weights_only=True" in run.result["message"]
    assert not marker.exists()
    assert failure_report(client, bucket, "evil-fp16/")["outcome"]["reason"] == "UnsafeModel"


def test_overflow_fails_validation_and_int8_state_dict_is_unsupported(
    client, bucket, s3_server, worker_env, tmp_path
):
    weights = {"proj.weight": torch.randn(4, 4), "gain": torch.tensor([1.0, 1e5])}
    torch.save(weights, tmp_path / "model.pt")
    client.upload_file(str(tmp_path / "model.pt"), bucket, "m/model.pt")
    job = manifest(f"s3://{bucket}/m/model.pt", f"s3://{bucket}/m-fp16/", {"precision": "fp16"},
                   endpoint=s3_server.endpoint)  # fmt: skip
    run = run_worker(job, tmp_path, worker_env)
    assert run.code == 40, run.log
    assert "'gain'" in run.result["message"] and "keepFp32" in run.result["message"]
    validation = failure_report(client, bucket, "m-fp16/")["models"][0]["validation"]
    assert validation["kind"] == "tensors" and validation["overflowValues"] == 1

    job = manifest(f"s3://{bucket}/m/model.pt", f"s3://{bucket}/m-int8/", {"precision": "int8"},
                   endpoint=s3_server.endpoint)  # fmt: skip
    run = run_worker(job, tmp_path, worker_env)
    assert (run.code, run.result["reason"]) == (30, "UnsupportedFormat"), run.log
    assert "nothing to quantize" in run.result["message"]
    assert failure_report(client, bucket, "m-int8/")["outcome"]["reason"] == "UnsupportedFormat"
