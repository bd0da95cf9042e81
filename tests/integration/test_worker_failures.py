"""Failure paths of the worker process: each ends with its reason and exit code; once the
output was found writable, the failure's report.json is all that appears under it (in a set
folder of its own: no manifest, no fixed names), and the promotion prefix is left as it
was."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import free_port, silero_dir
from worker_helpers import (
    VARIANTS,
    failure_report,
    get_bytes,
    list_keys,
    manifest,
    run_worker,
    speech_feeds,
    upload_dir,
)

from kquant_job.audio import write_feeds

FP16 = {"precision": "fp16"}
SILERO = "silero_vad_16k_op15.onnx"
GENERATED = {  # validation inputs for op15 without data files
    "inputs": {
        "input": {"shape": [1, 576]},
        "state": {"shape": [2, 1, 128], "value": 0},
        "sr": {"value": 16000},
    },
    "samples": 4,
}


def job_for(bucket: str, endpoint: str, model_key: str = f"m/{SILERO}", **kw) -> dict:
    return manifest(
        f"s3://{bucket}/{model_key}",
        f"s3://{bucket}/out/",
        kw.pop("quantization", FP16),
        endpoint=endpoint,
        validation=kw.pop("validation", GENERATED),
        **kw,
    )


def expect_failure(run, reason: str, code: int) -> None:
    assert run.code == code, run.log
    assert run.result["phase"] == "Failed"
    assert run.result["reason"] == reason, run.result
    assert reason in run.log


@pytest.fixture
def client(s3_server):
    return s3_server.client()


def test_missing_object(client, bucket, s3_server, worker_env, tmp_path):
    run = run_worker(job_for(bucket, s3_server.endpoint, "m/absent.onnx"), tmp_path, worker_env)
    expect_failure(run, "SourceNotFound", 20)
    assert f"s3://{bucket}/m/absent.onnx" in run.result["message"]
    report = failure_report(client, bucket, "out/")
    assert report["outcome"]["reason"] == "SourceNotFound"
    assert run.result["reportUri"].startswith(f"s3://{bucket}/out/.kquant/sets/")
    assert list_keys(client, bucket, "m/") == []


def test_wrong_credentials(s3_auth_server, tmp_path):
    admin = s3_auth_server.client()
    admin.create_bucket(Bucket="kq-worker-auth")
    admin.upload_file(str(silero_dir() / SILERO), "kq-worker-auth", f"m/{SILERO}")
    env = s3_auth_server.env()
    env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    run = run_worker(job_for("kq-worker-auth", s3_auth_server.endpoint), tmp_path, env)
    expect_failure(run, "AccessDenied", 20)
    assert "not-the-secret" not in run.log + json.dumps(run.result)
    # (moto's signature check rejects prefixed listings; list the bucket whole instead)
    keys = [o["Key"] for o in admin.list_objects_v2(Bucket="kq-worker-auth").get("Contents", [])]
    assert keys == [f"m/{SILERO}"]


def test_endpoint_down(worker_env, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run = run_worker(job_for("kq-down", endpoint), tmp_path, worker_env)
    expect_failure(run, "StorageUnavailable", 21)


@pytest.mark.parametrize(
    ("payload", "key", "reason"),
    [
        ("truncated", f"m/{SILERO}", "CorruptModel"),
        ("text", "m/README.txt", "UnsupportedFormat"),
    ],
)
def test_bad_model_bytes(payload, key, reason, client, bucket, s3_server, worker_env, tmp_path):
    data = (silero_dir() / SILERO).read_bytes()
    body = data[: len(data) // 3] if payload == "truncated" else b"# not a model\n" * 10
    client.put_object(Bucket=bucket, Key=key, Body=body)
    run = run_worker(job_for(bucket, s3_server.endpoint, key), tmp_path, worker_env)
    expect_failure(run, reason, 30)
    assert failure_report(client, bucket, "out/")["outcome"]["reason"] == reason


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("manifest.json", "ForeignObject"),  # another tool's manifest: never replaced
        ("notes.txt", "OutputExists"),  # anything at all in a fresh output
    ],
)
def test_output_holding_foreign_objects_is_left_untouched(
    key, reason, client, bucket, s3_server, worker_env, tmp_path
):
    client.upload_file(str(silero_dir() / SILERO), bucket, f"m/{SILERO}")
    client.put_object(Bucket=bucket, Key=f"out/{key}", Body=b'{"previous": true}')
    for overwrite in (False, True):
        job = job_for(bucket, s3_server.endpoint)
        job["spec"]["output"]["overwrite"] = overwrite
        run = run_worker(job, tmp_path, worker_env)
        if overwrite and key == "notes.txt":  # replace mode leaves foreign objects alone
            assert run.code == 0, run.log
            break
        expect_failure(run, reason, 20)
        assert key in run.result["message"]
        assert list_keys(client, bucket, "out/") == [key]
    assert get_bytes(client, bucket, f"out/{key}") == b'{"previous": true}'


def test_tolerance_exceeded_publishes_report_only_and_keeps_promotion(
    client, bucket, s3_server, worker_env, tmp_path
):
    client.upload_file(str(silero_dir() / SILERO), bucket, f"m/{SILERO}")
    client.put_object(Bucket=bucket, Key="prod/model.onnx", Body=b"validated v1")
    # repair: false -> no probe-driven repair; the full validation decides.
    validation = {**GENERATED, "tolerance": {"maxAbsError": 1e-9}}
    job = job_for(
        bucket,
        s3_server.endpoint,
        validation=validation,
        quantization={"precision": "fp16", "repair": False},
        promotion=f"s3://{bucket}/prod/",
    )
    run = run_worker(job, tmp_path, worker_env)
    expect_failure(run, "ValidationFailed", 40)
    report = failure_report(client, bucket, "out/")
    assert report["outcome"]["reason"] == "ValidationFailed"
    assert report["models"][0]["validation"]["passed"] is False
    assert run.result["reportUri"].endswith("/report.json")
    assert json.loads(get_bytes(client, bucket, run.result["reportUri"][len(f"s3://{bucket}/") :]))
    assert run.result["validation"]["passed"] is False
    assert "maxAbsError" in run.result["message"]
    assert list_keys(client, bucket, "prod/") == ["model.onnx"]
    assert get_bytes(client, bucket, "prod/model.onnx") == b"validated v1"


def test_static_int8_default_tolerance_fails_cleanly(
    client, bucket, s3_server, worker_env, tmp_path
):
    variant = next(v for v in VARIANTS if v.file == SILERO)
    client.upload_file(str(silero_dir() / SILERO), bucket, f"m/{SILERO}")
    upload_dir(client, bucket, "calib/", _feeds(tmp_path / "calib", variant, True))
    upload_dir(client, bucket, "eval/", _feeds(tmp_path / "eval", variant, False))
    quantization = {
        "precision": "int8",
        "mode": "static",
        "calibration": {"uri": f"s3://{bucket}/calib/", "samples": 16},
    }
    validation = {"dataUri": f"s3://{bucket}/eval/", "feedback": variant.feedback, "samples": 32}
    run = run_worker(
        job_for(bucket, s3_server.endpoint, quantization=quantization, validation=validation),
        tmp_path,
        worker_env,
    )
    expect_failure(run, "ValidationFailed", 40)
    details = failure_report(client, bucket, "out/")["models"][0]["details"]
    assert details["probePassed"] is False
    assert details["attempts"][0]["attempt"] == "requested"


def _feeds(path, variant, threaded):
    write_feeds(speech_feeds(variant, 32, threaded=threaded), path)
    return path


def test_hostile_keys_in_model_prefix(client, bucket, s3_server, worker_env, tmp_path):
    client.upload_file(str(silero_dir() / SILERO), bucket, f"dir/{SILERO}")
    client.put_object(Bucket=bucket, Key="dir/../../escape.txt", Body=b"x")
    run = run_worker(job_for(bucket, s3_server.endpoint, "dir/"), tmp_path, worker_env)
    expect_failure(run, "UnsafePath", 20)
    assert not (tmp_path / "escape.txt").exists()
    assert not list((tmp_path / "work").rglob("*.onnx"))
    assert failure_report(client, bucket, "out/")["outcome"]["reason"] == "UnsafePath"


def test_a_dot_dot_key_is_unsafe_not_an_outage(client, bucket, s3_server, worker_env, tmp_path):
    client.put_object(Bucket=bucket, Key="m/..", Body=b"whatever")
    run = run_worker(job_for(bucket, s3_server.endpoint, "m/.."), tmp_path, worker_env)
    expect_failure(run, "UnsafePath", 20)
    assert "'..'" in run.result["message"]


def test_invalid_spec_writes_nothing(client, bucket, s3_server, worker_env, tmp_path):
    job = job_for(bucket, s3_server.endpoint, quantization={"precision": "fp16", "mode": "static"})
    run = run_worker(job, tmp_path, worker_env)
    expect_failure(run, "InvalidSpec", 10)
    assert "spec.quantization.mode" in run.result["message"]
    assert list_keys(client, bucket, "") == []


def test_unattainable_tolerance_ends_in_conversion_failed_with_what_was_tried(
    client, bucket, s3_server, worker_env, tmp_path
):
    client.upload_file(str(silero_dir() / SILERO), bucket, f"m/{SILERO}")
    validation = {**GENERATED, "tolerance": {"maxAbsError": 1e-9}}
    run = run_worker(
        job_for(bucket, s3_server.endpoint, validation=validation), tmp_path, worker_env
    )
    expect_failure(run, "ConversionFailed", 30)
    message = run.result["message"]
    assert "attempts" in message and "every node FP32" in message
    report = failure_report(client, bucket, "out/")  # what was tried, in full
    assert report["outcome"]["reason"] == "ConversionFailed"
    assert report["detail"]["attempts"] and run.result["reportUri"].endswith("/report.json")


def test_source_beyond_the_work_volume_is_refused_before_fetching(
    client, bucket, s3_server, worker_env, tmp_path
):
    """KQUANT_WORK_BYTES (the operator's emptyDir sizeLimit) of 1 MB: the 2.3 MB model would
    need 3x its size for FP16; nothing is fetched, nothing but the failure's report is
    written."""
    client.upload_file(str(silero_dir() / SILERO), bucket, f"m/{SILERO}")
    env = {**worker_env, "KQUANT_WORK_BYTES": str(10**6)}
    run = run_worker(job_for(bucket, s3_server.endpoint), tmp_path, env)
    expect_failure(run, "SourceTooLarge", 20)
    assert f"s3://{bucket}/m/{SILERO}" in run.result["message"]
    assert "1000000 bytes" in run.result["message"] and "x 3" in run.result["message"]
    assert failure_report(client, bucket, "out/")["outcome"]["reason"] == "SourceTooLarge"
    assert not list((tmp_path / "work").rglob(SILERO))


def test_a_source_read_in_place_is_not_counted_in_the_work_volume(
    client, bucket, s3_server, worker_env, tmp_path
):
    """FP16 counts 3x the source in the work volume, the source included; a local source is
    read where it lies, so it needs 2x: a volume of 2.5x refuses the S3 copy and runs the
    local file."""
    model = silero_dir() / SILERO
    env = {**worker_env, "KQUANT_WORK_BYTES": str(int(model.stat().st_size * 2.5))}
    client.upload_file(str(model), bucket, f"m/{SILERO}")
    remote = run_worker(job_for(bucket, s3_server.endpoint), tmp_path / "s3", env)
    expect_failure(remote, "SourceTooLarge", 20)
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", FP16, endpoint=None,
                   validation=GENERATED)  # fmt: skip
    local = run_worker(job, tmp_path / "local", env)
    assert local.code == 0, local.log
    assert "reading the source in place" in local.log


@pytest.mark.parametrize("quantization", [FP16, {"precision": "int8"}])
def test_a_model_already_in_fp16_is_refused_with_its_reason(tmp_path, quantization):
    """A new user's FP16 model: FP16 again, or INT8 (onnxruntime's quantizers need FP32
    weights), ended in ConversionFailed with onnxruntime's internal errors."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = tmp_path / "m" / "vad_fp16.onnx"
    model.parent.mkdir()
    src = onnx.load(str(silero_dir() / SILERO))
    onnx.save(convert_float_to_float16(src, keep_io_types=True), str(model))
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", quantization, endpoint=None,
                   validation=GENERATED)  # fmt: skip
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    expect_failure(run, "AlreadyQuantized", 30)
    assert "already a float16 model" in run.result["message"]
    assert "convert its FP32 original" in run.result["message"]
    assert not list((tmp_path / "out").rglob("*.onnx"))  # nothing published
    # the source's own weights, the same for both (new-user trial: INT8's count, taken after
    # the pre-processing's constant folding, named more bytes than the file held)
    held, total = re.search(
        r"(\d+) of its (\d+) float weight bytes", run.result["message"]
    ).groups()
    assert int(held) <= int(total) <= model.stat().st_size


def test_a_foreign_object_at_an_output_name_is_found_before_converting(tmp_path):
    """overwrite: true on a prefix where someone put their own silero_vad_fp16.onnx: the run
    ends in ForeignObject while planning, as the dry run does (before: after converting)."""
    model = silero_dir() / SILERO
    out = tmp_path / "out"
    out.mkdir()
    (out / SILERO.replace(".onnx", "_fp16.onnx")).write_bytes(b"someone's own model")
    job = manifest(f"file://{model}", f"file://{out}/", FP16, endpoint=None,
                   validation=GENERATED)  # fmt: skip
    job["spec"]["output"]["overwrite"] = True
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    expect_failure(run, "ForeignObject", 20)
    assert "convert: start" not in run.log
    assert (out / SILERO.replace(".onnx", "_fp16.onnx")).read_bytes() == b"someone's own model"


def test_another_local_spec_under_the_same_name_does_not_replace_the_output(tmp_path):
    """Outside a cluster a job has no uid or generation: two unnamed specs (both
    'quantizationjob') with different models and one output, overwrite false, and the second
    silently replaced the first's model. Its spec now stands for the generation: OutputExists,
    the first set intact; a rerun of the first spec still replaces its own set."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("silero_vad.onnx", "silero_vad_op18_ifless.onnx"):
        (models / name).write_bytes((silero_dir() / name).read_bytes())
    out = f"file://{tmp_path}/out/"

    def spec(model: str) -> dict:
        job = manifest(f"file://{models / model}", out, {"precision": "fp16"}, endpoint=None)
        del job["metadata"]["name"]  # the default name, as in a user's minimal spec
        return job

    first = run_worker(spec("silero_vad.onnx"), tmp_path / "r1", dict(os.environ))
    assert first.code == 0, first.log
    published = (tmp_path / "out" / "silero_vad_fp16.onnx").read_bytes()
    second = run_worker(spec("silero_vad_op18_ifless.onnx"), tmp_path / "r2", dict(os.environ))
    expect_failure(second, "OutputExists", 20)
    assert "another spec under this metadata.name" in second.result["message"]
    assert (tmp_path / "out" / "silero_vad_fp16.onnx").read_bytes() == published
    assert not (tmp_path / "out" / "silero_vad_op18_ifless_fp16.onnx").exists()
    again = run_worker(spec("silero_vad.onnx"), tmp_path / "r3", dict(os.environ))
    assert again.code == 0, again.log  # the same spec: a rerun


def test_samples_that_are_no_npz_files_are_refused_naming_the_field(tmp_path):
    """A folder of WAVs as validation.dataUri (kquant-job frames forgotten) was ignored: the
    job validated on kquant's own clip and said Validated. An empty calibration folder said
    "no files under" without naming the field."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "vad.onnx").write_bytes((silero_dir() / "silero_vad.onnx").read_bytes())
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    (wavs / "speech.wav").write_bytes(b"RIFF....WAVE")
    job = manifest(f"file://{models / 'vad.onnx'}", f"file://{tmp_path}/out/",
                   {"precision": "fp16"}, endpoint=None,
                   validation={"dataUri": f"file://{wavs}/"})  # fmt: skip
    run = run_worker(job, tmp_path / "r1", dict(os.environ))
    expect_failure(run, "InvalidSpec", 10)
    message = run.result["message"]
    assert "spec.validation.dataUri" in message and "speech.wav" in message, message
    assert "kquant-job frames" in message
    empty = tmp_path / "calibration"
    empty.mkdir()
    static = {"precision": "int8", "mode": "static", "calibration": {"uri": f"file://{empty}/"}}
    job = manifest(f"file://{models / 'vad.onnx'}", f"file://{tmp_path}/out2/", static,
                   endpoint=None)  # fmt: skip
    run = run_worker(job, tmp_path / "r2", dict(os.environ))
    assert run.result["reason"] in ("SourceNotFound", "InvalidSpec"), run.result
    assert "spec.quantization.calibration.uri" in run.result["message"], run.result["message"]


def test_an_onnx_model_that_exhausts_memory_is_memory_limit_exceeded(tmp_path):
    """Hostile-input trial: a model whose ConstantOfShape asks for 2^40 floats ended in
    InvalidSpec ("give the inputs it takes"), the input search having cut onnxruntime's
    allocation error to 200 characters before the sandbox could read it."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "shape")
    one = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=one),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"])]  # fmt: skip
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [shape]),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    model.ir_version = 8
    path = tmp_path / "m" / "bomb.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path))
    job = manifest(f"file://{path}", f"file://{tmp_path}/out/", FP16, endpoint=None)
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    expect_failure(run, "MemoryLimitExceeded", 30)
    assert not (tmp_path / "out" / "manifest.json").exists()
