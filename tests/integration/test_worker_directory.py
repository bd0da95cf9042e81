"""A model directory (the SenseVoice layout: a model file with external data, plus config,
tokenizer and vocabulary files) from an S3 prefix: the model is converted, every other file
is copied byte for byte, the layout is mirrored, and the manifest lists the whole set."""

from __future__ import annotations

import io
import json
import os

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


def test_several_models_take_their_own_data_shared_data_and_their_own_settings(tmp_path):
    from worker_helpers import VARIANTS, speech_feeds

    from kquant_job.audio import write_feeds

    src, data = tmp_path / "models", tmp_path / "eval"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "vad.onnx").write_bytes((silero_dir() / "silero_vad_16k_op15.onnx").read_bytes())
    (src / "b" / "seq.onnx").write_bytes(
        (silero_dir() / "silero_vad_16k_sequence.onnx").read_bytes()
    )
    vad = next(v for v in VARIANTS if v.file == "silero_vad_16k_op15.onnx")
    seq = next(v for v in VARIANTS if v.file == "silero_vad_16k_sequence.onnx")
    write_feeds(speech_feeds(vad, 12), data / "a" / "vad.onnx")  # a/vad.onnx's own folder
    write_feeds(speech_feeds(seq, 7), data)  # the top: every model without a folder
    job = manifest(
        f"file://{src}/", f"file://{tmp_path}/out/", {"precision": "fp16"}, endpoint=None,
        validation={
            "dataUri": f"file://{data}/",
            "samples": 50,
            "feedback": {"stateN": "state"},  # vad's
            "models": {"seq.onnx": {"feedback": {"hn": "h", "cn": "c"}}},
        },
    )  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert run.code == 0, run.log
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    samples = {m["path"]: m["validation"]["samples"] for m in report["models"]}
    assert samples == {"a/vad.onnx": 12, "b/seq.onnx": 7}
    assert "validation data for a/vad.onnx files=12" in run.log

    job["spec"]["validation"]["models"] = {"c/*.onnx": {"inputs": {"x": {"value": 1}}}}
    job["spec"]["output"]["uri"] = f"file://{tmp_path}/out2/"
    wrong = run_worker(job, tmp_path / "wrong", dict(os.environ))
    assert (wrong.code, wrong.result["reason"]) == (10, "InvalidSpec"), wrong.log
    assert "spec.validation.models.c/*.onnx: matches no model file" in wrong.result["message"]

    # a feedback error names the field it came from (new-user trial: it named the top one)
    job["spec"]["validation"]["models"] = {"seq.onnx": {"feedback": {"hn": "h", "cx": "c"}}}
    job["spec"]["output"]["uri"] = f"file://{tmp_path}/out3/"
    bad = run_worker(job, tmp_path / "bad", dict(os.environ))
    assert (bad.code, bad.result["reason"]) == (10, "InvalidSpec"), bad.log
    assert bad.result["message"].startswith(
        "spec.validation.models.seq.onnx.feedback: the model has no output 'cx'"
    ), bad.result["message"]


def test_an_earlier_output_inside_the_model_folder_is_skipped(tmp_path):
    """A job on models/silero.onnx published to models/out/; a later job on the folder
    models/ converts silero.onnx and neither re-converts nor copies that output (before:
    its silero_fp16.onnx, and the set's copy of it, were planned as originals)."""
    src = tmp_path / "models"
    src.mkdir()
    (src / "silero.onnx").write_bytes((silero_dir() / "silero_vad.onnx").read_bytes())
    first = manifest(f"file://{src}/silero.onnx", f"file://{src}/out/", {"precision": "fp16"},
                     endpoint=None)  # fmt: skip
    run = run_worker(first, tmp_path / "first", dict(os.environ))
    assert run.code == 0, run.log
    assert (src / "out" / "silero_fp16.onnx").is_file() and (src / "out" / ".kquant").is_dir()

    folder = manifest(f"file://{src}/", f"file://{tmp_path}/whole/", {"precision": "fp16"},
                      endpoint=None)  # fmt: skip
    again = run_worker(folder, tmp_path / "again", dict(os.environ))
    assert again.code == 0, again.log
    assert "out/ holds an earlier kquant output" in again.log
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert [m["path"] for m in report["models"]] == ["silero.onnx"]
    published = sorted(
        p.relative_to(tmp_path / "whole").as_posix()
        for p in (tmp_path / "whole").rglob("*")
        if p.is_file() and ".kquant" not in p.parts
    )
    assert published == ["manifest.json", "report.json", "silero.onnx"]
