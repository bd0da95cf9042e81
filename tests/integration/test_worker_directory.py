"""A model directory (the SenseVoice layout: a model file with external data, plus config,
tokenizer and vocabulary files) from an S3 prefix: the model is converted, every other file
is copied byte for byte, the layout is mirrored, and the manifest lists the whole set."""

from __future__ import annotations

import io
import json

import onnx
from conftest import silero_dir
from onnx import TensorProto
from worker_helpers import (
    get_bytes,
    manifest,
    published_keys,
    run_worker,
    sha256,
    upload_dir,
)

SIDE_FILES = {
    "config.json": b'{"sample_rate": 16000, "frame": 512}\n',
    "tokenizer.json": b'{"model": {"type": "BPE"}}\n',
    "vocab.txt": "<blank>\n<s>\n</s>\n你好\n".encode(),
    "assets/cmvn.txt": b"0.1 0.2 0.3\n",
}


def test_directory_model_with_external_data(s3_server, bucket, worker_env, tmp_path):
    src = tmp_path / "SenseVoiceSmall"
    (src / "assets").mkdir(parents=True)
    model = onnx.load(str(silero_dir() / "silero_vad_16k_op15.onnx"))
    onnx.save(
        model,
        str(src / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    for rel, data in SIDE_FILES.items():
        (src / rel).write_bytes(data)
    client = s3_server.client()
    upload_dir(client, bucket, "SenseVoiceSmall/", src)

    job = manifest(
        f"s3://{bucket}/SenseVoiceSmall/",
        f"s3://{bucket}/SenseVoiceSmall_fp16/",
        {"precision": "fp16"},
        endpoint=s3_server.endpoint,
        validation={
            "samples": 4,
            "inputs": {"input": {"shape": [1, 576]}, "state": {"value": 0}, "sr": {"value": 16000}},
        },
    )
    run = run_worker(job, tmp_path, worker_env)
    assert run.code == 0, run.log

    keys = published_keys(client, bucket, "SenseVoiceSmall_fp16/")
    assert "model.onnx" in keys and "model.onnx.data" not in keys  # rewritten, self-contained
    assert set(keys) == {"model.onnx", "report.json", "manifest.json", *SIDE_FILES}
    for rel, data in SIDE_FILES.items():
        assert get_bytes(client, bucket, f"SenseVoiceSmall_fp16/{rel}") == data
    converted = onnx.load(io.BytesIO(get_bytes(client, bucket, "SenseVoiceSmall_fp16/model.onnx")))
    assert any(t.data_type == TensorProto.FLOAT16 for t in converted.graph.initializer)

    report = json.loads(get_bytes(client, bucket, "SenseVoiceSmall_fp16/report.json"))
    actions = {f["path"]: f["action"] for f in report["files"]}
    assert actions == {"model.onnx": "converted", **dict.fromkeys(SIDE_FILES, "copied")}
    listed = json.loads(get_bytes(client, bucket, "SenseVoiceSmall_fp16/manifest.json"))
    digests = {a["name"]: a["sha256"] for a in listed["artifacts"]}
    assert digests["vocab.txt"] == sha256(SIDE_FILES["vocab.txt"])
    assert set(digests) == {"model.onnx", *SIDE_FILES}
    # sizes count the model and its external data, before and after
    original = (src / "model.onnx").stat().st_size + (src / "model.onnx.data").stat().st_size
    assert run.result["originalBytes"] == original
    assert run.result["quantizedBytes"] < original
