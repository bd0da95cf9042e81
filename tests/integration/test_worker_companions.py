"""A model URI naming one .onnx whose tensors live in a data file beside it: the worker
brings the files the model names (and no others), refuses names outside the model's folder,
and says which file is missing."""

from __future__ import annotations

import io
import os
from pathlib import Path

import onnx
import pytest
from conftest import save_external
from corpus import build_corpus
from onnx import TensorProto
from worker_helpers import failure_report, get_bytes, list_keys, manifest, run_worker

FP16 = {"precision": "fp16"}


def _external(folder: Path, location: str = "model.onnx.data") -> Path:
    """bert_tiny with every tensor in ``folder/location``; returns the .onnx path."""
    return save_external(build_corpus()["bert_tiny"].path, folder, location)


def _relocate(model: Path, location: str) -> None:
    """Point every external-data reference of ``model`` at ``location`` (bytes unchanged)."""
    proto = onnx.load(str(model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(model))


def test_an_s3_model_brings_its_data_file_and_nothing_else(s3_server, bucket, worker_env, tmp_path):
    model = _external(tmp_path / "src")
    client = s3_server.client()
    for path in (model, model.with_name("model.onnx.data")):
        client.upload_file(str(path), bucket, f"m/{path.name}")
    client.put_object(Bucket=bucket, Key="m/unrelated.bin", Body=b"\0" * 4096)
    job = manifest(f"s3://{bucket}/m/model.onnx", f"s3://{bucket}/out/", FP16,
                   endpoint=s3_server.endpoint, validation={"samples": 2})  # fmt: skip
    run = run_worker(job, tmp_path / "run", worker_env)
    assert run.code == 0, run.log
    assert "external data beside the model" in run.log
    fetched = sorted(p.name for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert "unrelated.bin" not in fetched
    data = model.with_name("model.onnx.data").stat().st_size
    assert run.result["originalBytes"] == model.stat().st_size + data
    keys = list_keys(client, bucket, "out/")
    name = next(k for k in keys if k.endswith(".onnx"))
    converted = onnx.load(io.BytesIO(get_bytes(client, bucket, f"out/{name}")))
    assert any(t.data_type == TensorProto.FLOAT16 for t in converted.graph.initializer)


def test_a_missing_data_file_is_named(s3_server, bucket, worker_env, tmp_path):
    model = _external(tmp_path / "src")
    client = s3_server.client()
    client.upload_file(str(model), bucket, "m/model.onnx")  # the data file left behind
    job = manifest(f"s3://{bucket}/m/model.onnx", f"s3://{bucket}/out/", FP16,
                   endpoint=s3_server.endpoint)  # fmt: skip
    run = run_worker(job, tmp_path / "run", worker_env)
    assert run.code != 0
    assert run.result["reason"] == "SourceNotFound", run.result
    assert f"s3://{bucket}/m/model.onnx.data" in run.result["message"]
    failure_report(client, bucket, "out/")


@pytest.mark.parametrize("location", ["../secret.data", "/etc/passwd", "a/../../x.data"])
def test_a_location_outside_the_folder_is_refused_before_any_transfer(
    s3_server, bucket, worker_env, tmp_path, location
):
    model = _external(tmp_path / "src")
    _relocate(model, location)
    client = s3_server.client()
    client.upload_file(str(model), bucket, "m/model.onnx")
    client.put_object(Bucket=bucket, Key="secret.data", Body=b"\1" * 64)
    job = manifest(f"s3://{bucket}/m/model.onnx", f"s3://{bucket}/out/", FP16,
                   endpoint=s3_server.endpoint)  # fmt: skip
    run = run_worker(job, tmp_path / "run", worker_env)
    assert run.result["reason"] == "UnsafePath", run.result
    assert repr(location) in run.result["message"]
    assert not [p for p in (tmp_path / "run").rglob("secret.data")]


def test_a_local_model_reads_its_data_file_in_place(tmp_path):
    model = _external(tmp_path / "src")
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", FP16, endpoint=None,
                   validation={"samples": 2})  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert run.code == 0, run.log
    assert "reading the source in place" in run.log
    assert not list((tmp_path / "run").rglob("model.onnx.data"))  # not copied


def test_a_local_data_file_that_links_out_of_the_folder_is_refused(tmp_path):
    model = _external(tmp_path / "src", location="weights.bin")
    outside = tmp_path / "elsewhere" / "weights.bin"
    outside.parent.mkdir()
    model.with_name("weights.bin").rename(outside)
    model.with_name("weights.bin").symlink_to(outside)
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", FP16, endpoint=None)
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert run.result["reason"] == "UnsafePath", run.result
    assert "outside the model's folder" in run.result["message"]
