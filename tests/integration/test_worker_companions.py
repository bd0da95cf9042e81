"""A model URI naming one .onnx whose tensors live in a data file beside it: the worker
brings the files the model names (and no others), refuses names outside the model's folder,
and says which file is missing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import save_external
from corpus import build_corpus
from onnx import TensorProto, helper, numpy_helper
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


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_dynamic_int8_of_a_local_model_read_in_place_writes_nothing_beside_it(tmp_path, layout):
    """Dynamic INT8 without pre-processing (a graph it cannot change) handed onnxruntime
    the source itself, whose loader writes ``<name>-inferred.onnx`` beside it: in the
    sandbox, where a source read in place is read-only, every attempt failed."""
    # one MatMul on 64 MiB of weights: large enough to skip pre-processing (SKIP_FROM_BYTES)
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal(
        (4096, 4096), dtype=np.float32) * 0.01, "w")  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])], [weight],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (tmp_path / "src").mkdir()
    model = tmp_path / "src" / "model.onnx"
    onnx.save(proto, str(model), save_as_external_data=True, location="model.onnx.data")
    before = sorted(p.name for p in model.parent.iterdir())
    uri = f"file://{model}" if layout == "file" else f"file://{model.parent}/"
    job = manifest(uri, f"file://{tmp_path}/out/", {"precision": "int8", "requireGain": False},
                   endpoint=None, validation={"samples": 2})  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert run.code == 0, run.log
    assert "reading the source in place" in run.log
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    [model_report] = report["models"]
    assert model_report["details"]["preprocess"].startswith("skipped: no Conv")
    assert model_report["details"]["quantizedNodes"] > 0
    assert sorted(p.name for p in model.parent.iterdir()) == before


def test_a_local_data_file_that_links_out_of_the_folder_is_refused(tmp_path):
    model = _external(tmp_path / "src", location="weights.bin")
    outside = tmp_path / "elsewhere" / "weights.bin"
    outside.parent.mkdir()
    model.with_name("weights.bin").rename(outside)
    model.with_name("weights.bin").symlink_to(outside)
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", FP16, endpoint=None)
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert run.result["reason"] == "UnsafePath", run.result
    assert "weights.bin" in run.result["message"] and "outside" in run.result["message"]
    assert not list((tmp_path / "out").rglob("*.onnx"))  # nothing published


def _inspect(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kquant_job.cli", "inspect", "--json", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def test_inspect_of_one_onnx_reads_its_data_files(s3_server, bucket, worker_env, tmp_path):
    """``kquant-job inspect`` brings the data files as a run does (before: CorruptModel)."""
    model = _external(tmp_path / "src")
    local = _inspect(f"file://{model}", env=dict(os.environ))
    assert local.returncode == 0, local.stderr
    (m,) = json.loads(local.stdout)["models"]
    weights = {
        t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(model)).graph.initializer
    }
    listed = {e["name"]: e for e in m["initializers"]}
    assert weights.keys() <= listed.keys()  # with the Constant nodes' values
    for name, array in weights.items():  # the values were read from the data file
        if array.dtype.kind == "f" and array.size:
            assert listed[name]["max"] == pytest.approx(float(array.max()), rel=1e-6)
    client = s3_server.client()
    for path in (model, model.with_name("model.onnx.data")):
        client.upload_file(str(path), bucket, f"m/{path.name}")
    env = {k: v for k, v in worker_env.items() if k != "AWS_ENDPOINT_URL"}
    remote = _inspect(f"s3://{bucket}/m/model.onnx", "--endpoint-url", s3_server.endpoint,
                      env=env)  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout)["models"][0]["initializers"] == m["initializers"]
    client.delete_object(Bucket=bucket, Key="m/model.onnx.data")
    missing = _inspect(f"s3://{bucket}/m/model.onnx", "--endpoint-url", s3_server.endpoint,
                       env=env)  # fmt: skip
    assert missing.returncode != 0 and "SourceNotFound" in missing.stderr
    assert f"s3://{bucket}/m/model.onnx.data" in missing.stderr


def test_inspect_refuses_a_data_file_outside_the_folder(tmp_path):
    model = _external(tmp_path / "src")
    _relocate(model, "../secret.data")
    (tmp_path / "secret.data").write_bytes(b"\1" * 64)
    proc = _inspect(f"file://{model}", env=dict(os.environ))
    assert proc.returncode != 0 and "UnsafePath" in proc.stderr
