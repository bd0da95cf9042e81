"""Every FP32 Silero VAD ONNX variant through fp16, int8 dynamic and int8 static, end to end:
the real ``kquant-job`` process against moto's S3 server, real speech for validation and
calibration, assertions on the published files, the metrics and the layout."""

from __future__ import annotations

import io
import json
from collections import Counter

import onnx
import pytest
from conftest import silero_dir
from onnx import TensorProto
from published import Prefix, read_set
from worker_helpers import (
    VARIANTS,
    Variant,
    failure_report,
    get_bytes,
    manifest,
    run_worker,
    sha256,
    speech_feeds,
    upload_dir,
)

from kquant_job.audio import write_feeds
from kquant_job.formats import graph_tensors

VALIDATION_FRAMES = 48
CALIBRATION_FRAMES = 24
METHODS = {
    "fp16": {"precision": "fp16"},
    # No gain verdict: Silero's dynamic INT8 runs 1.2-1.7x FP32's latency, by CPU (the
    # verdict itself: test_worker_gain); the files and their validation are tested here.
    "int8-dynamic": {"precision": "int8", "mode": "dynamic", "requireGain": False},
    "int8-static": {"precision": "int8", "mode": "static", "quantFormat": "QDQ"},
}
SUFFIX = {"fp16": "_fp16", "int8-dynamic": "_int8", "int8-static": "_int8"}
# Variants whose every weight lives inside If branches (16 kHz / 8 kHz paths).
WEIGHTS_ONLY_IN_IF = {"silero_vad.onnx", "silero_vad_op18_ifless.onnx"}
DYNAMIC_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM")


def test_every_shipped_onnx_variant_is_covered():
    assert sorted(v.file for v in VARIANTS) == sorted(p.name for p in silero_dir().glob("*.onnx"))


def op_counts(model: onnx.ModelProto) -> Counter:
    counts: Counter = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return counts


def tensor_types(model: onnx.ModelProto) -> Counter:
    return Counter(TensorProto.DataType.Name(t.data_type) for t in graph_tensors(model.graph))


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory):
    """Per variant: validation frames (initial state; the worker threads it) and calibration
    frames (state threaded through the FP32 model, as in use)."""
    root = tmp_path_factory.mktemp("speech")
    for variant in VARIANTS:
        write_feeds(speech_feeds(variant, VALIDATION_FRAMES), root / variant.file / "eval")
        write_feeds(
            speech_feeds(variant, CALIBRATION_FRAMES, threaded=True), root / variant.file / "calib"
        )
    return root


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.file.removesuffix(".onnx"))
def test_variant_converts_validates_and_publishes(
    variant: Variant, method, speech_data, s3_server, bucket, worker_env, tmp_path
):
    client = s3_server.client()
    client.upload_file(str(silero_dir() / variant.file), bucket, f"models/{variant.file}")
    upload_dir(client, bucket, "eval/", speech_data / variant.file / "eval")
    upload_dir(client, bucket, "calib/", speech_data / variant.file / "calib")
    quantization = dict(METHODS[method])
    if method == "int8-static":
        quantization["calibration"] = {
            "uri": f"s3://{bucket}/calib/",
            "samples": CALIBRATION_FRAMES,
        }
        # Static INT8 reaches none of the weights inside Silero's If branches: the file is
        # 0.99x the original's, NoGain by default (test_worker_gain); the file is checked here.
        quantization["requireGain"] = False
    validation = {
        "dataUri": f"s3://{bucket}/eval/",
        "samples": VALIDATION_FRAMES,
        "feedback": variant.feedback,
    }
    if method == "int8-static":
        # Measured: static INT8 moves Silero's speech probability by ~0.4 on average
        # (calibrated activation ranges do not fit its STFT/encoder convs), far outside the
        # default INT8 tolerance; see test_static_int8_default_tolerance_fails_cleanly.
        # Here the bound is loosened to check the produced files themselves.
        validation["tolerance"] = {"maxMeanAbsError": 2.0, "minCosineSimilarity": -1}
    job = manifest(
        f"s3://{bucket}/models/{variant.file}",
        f"s3://{bucket}/out/",
        quantization,
        endpoint=s3_server.endpoint,
        validation=validation,
    )
    run = run_worker(job, tmp_path, worker_env)
    if method == "int8-static" and variant.file in WEIGHTS_ONLY_IN_IF:
        # onnxruntime's static quantization cannot reach If-branch weights: a precise
        # failure, and nothing published (never the float model under an INT8 name).
        assert run.code == 30, run.log
        assert run.result["reason"] == "ConversionFailed"
        assert "mode: dynamic" in run.result["message"]
        assert failure_report(client, bucket, "out/")["outcome"]["reason"] == "ConversionFailed"
        return
    assert run.code == 0, run.log
    result = run.result
    assert (result["phase"], result["reason"]) == ("Succeeded", "Validated")

    # Layout: the converted model and its report, the manifest last -- nothing else.
    model_name = variant.file.replace(".onnx", SUFFIX[method] + ".onnx")
    out = Prefix(client=client, bucket=bucket, key="out/")
    manifest_doc = read_set(out)
    assert out.fixed_names() == sorted([model_name, "report.json", "manifest.json"])
    model_bytes = get_bytes(client, bucket, f"out/{model_name}")
    listed = {a["name"]: a for a in manifest_doc["artifacts"]}
    assert listed[model_name]["sha256"] == sha256(model_bytes)
    assert listed[model_name]["bytes"] == len(model_bytes) == result["quantizedBytes"]
    report_bytes = get_bytes(client, bucket, "out/report.json")
    assert manifest_doc["report"]["sha256"] == sha256(report_bytes)
    assert result["artifacts"][0] == {
        "uri": f"s3://{bucket}/out/{listed[model_name]['path']}",
        "sha256": sha256(model_bytes),
        "bytes": len(model_bytes),
    }

    # Metrics: within the (default) tolerance, on every validation frame.
    summary = result["validation"]
    assert summary["passed"] and summary["samples"] == VALIDATION_FRAMES
    assert summary["device"] in ("cpu", "cuda")
    if method != "int8-static":  # within the default tolerance
        assert summary["cosineSimilarity"] >= 0.98
        assert summary["meanAbsError"] <= 0.05
    assert summary["latencyMs"]["original"] > 0 and summary["latencyMs"]["quantized"] > 0
    report = json.loads(report_bytes)
    (model_report,) = report["models"]
    assert model_report["validation"]["passed"]
    assert report["outcome"]["reason"] == "Validated"

    # The produced file itself.
    model = onnx.load_model_from_string(model_bytes)
    types, ops = tensor_types(model), op_counts(model)
    original = onnx.load(str(silero_dir() / variant.file))
    if method == "fp16":
        assert result["quantizedBytes"] < 0.75 * result["originalBytes"]
        kept = set(model_report["details"].get("fp32Initializers", {}))
        assert types["FLOAT16"] > 0
        float_weights = [
            t.name
            for t in graph_tensors(model.graph)
            if t.data_type == TensorProto.FLOAT and t.name not in kept and len(t.dims) >= 2
        ]
        assert not float_weights, f"matrices left in FP32: {float_weights[:5]}"
        io_types = [i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)]
        original_io = [
            i.type.tensor_type.elem_type for i in (*original.graph.input, *original.graph.output)
        ]
        assert io_types == original_io  # keepIoTypes
        assert "opBlockList" in model_report["details"]
    elif method == "int8-dynamic":
        assert types["INT8"] > 0
        assert sum(ops[op] for op in DYNAMIC_OPS) == model_report["details"]["quantizedNodes"] > 0
    else:
        assert types["INT8"] > 0
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0


def test_int8_static_writes_calibrated_qdq_and_qoperator(
    speech_data, s3_server, bucket, worker_env, tmp_path
):
    variant = next(v for v in VARIANTS if v.file == "silero_vad_16k_op15.onnx")
    client = s3_server.client()
    client.upload_file(str(silero_dir() / variant.file), bucket, "m/silero_vad.onnx")
    upload_dir(client, bucket, "calib/", speech_data / variant.file / "calib")
    job = manifest(
        f"s3://{bucket}/m/silero_vad.onnx",
        f"s3://{bucket}/qop/",
        {
            "precision": "int8",
            "mode": "static",
            "quantFormat": "QOperator",
            "calibration": {
                "uri": f"s3://{bucket}/calib/",
                "calibrateMethod": "Entropy",
                "samples": 8,
            },
            "requireGain": False,  # 0.99x the original's size: the file itself is checked
        },
        endpoint=s3_server.endpoint,
        validation={"enabled": False},
    )
    run = run_worker(job, tmp_path, worker_env)
    assert run.code == 0, run.log
    # published, but never called validated
    assert (run.result["reason"], "validation" in run.result) == ("Converted", False)
    assert "not validated" in run.result["message"]
    assert "skipped: spec.validation.enabled is false" in run.log
    ops = op_counts(onnx.load(io.BytesIO(get_bytes(client, bucket, "qop/silero_vad_int8.onnx"))))
    assert sum(n for op, n in ops.items() if op.startswith("QLinear")) > 0
    report = json.loads(get_bytes(client, bucket, "qop/report.json"))
    details = report["models"][0]["details"]
    assert report["models"][0]["validation"] == {"skipped": True}
    assert report["outcome"]["reason"] == "Converted"
    assert json.dumps(details).count("Entropy") >= 1
