"""Variants in one job, end to end through the worker process: every candidate converted
and validated on the same samples, every passing one published under its own name in one
set, the best by the objective chosen and promoted, the others' failures compared in the
result, the report and the table; a job fails only when no variant passes."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import silero_dir
from published import Prefix, read_set
from worker_helpers import (
    VARIANTS,
    failure_report,
    get_bytes,
    manifest,
    run_worker,
    speech_feeds,
    upload_dir,
)

from kquant_job.audio import write_feeds

SILERO = next(v for v in VARIANTS if v.file == "silero_vad.onnx")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibration frames for silero_vad.onnx, state threaded through the FP32 model."""
    root = tmp_path_factory.mktemp("calib")
    write_feeds(speech_feeds(SILERO, 8, threaded=True), root)
    return root


def variants(calib_uri: str) -> list[dict]:
    return [
        {"precision": "fp16"},
        # no gain verdict: Silero's INT8 runs 1.2-1.7x FP32's latency, by CPU
        {"precision": "int8", "requireGain": False},
        {"precision": "int8", "mode": "static", "calibration": {"uri": calib_uri}},
    ]


def test_every_passing_variant_is_published_and_the_smallest_promoted(
    calib, s3_server, bucket, worker_env, tmp_path
):
    client = s3_server.client()
    client.upload_file(str(silero_dir() / "silero_vad.onnx"), bucket, "m/silero_vad.onnx")
    upload_dir(client, bucket, "calib/", calib)
    job = manifest(f"s3://{bucket}/m/silero_vad.onnx", f"s3://{bucket}/out/", {},
                   endpoint=s3_server.endpoint, promotion=f"s3://{bucket}/prod/")  # fmt: skip
    del job["spec"]["quantization"]
    job["spec"]["variants"] = variants(f"s3://{bucket}/calib/")
    run = run_worker(job, tmp_path, worker_env)
    assert run.code == 0, run.log
    result = run.result
    # Silero VAD: FP16 0.55x, INT8 dynamic 0.76x; static INT8 cannot reach its If branches
    assert result["chosen"] == "fp16" and result["precision"] == "fp16"
    by_name = {v["name"]: v for v in result["variants"]}
    assert list(by_name) == ["fp16", "int8", "int8_static"]
    assert by_name["fp16"]["passed"] and by_name["int8"]["passed"]
    assert by_name["int8_static"]["reason"] == "ConversionFailed"
    assert "mode: dynamic" in by_name["int8_static"]["message"]
    assert by_name["fp16"]["quantizedBytes"] < by_name["int8"]["quantizedBytes"]
    assert result["quantizedBytes"] == by_name["fp16"]["quantizedBytes"]
    assert "variant fp16 chosen (smallest passing: 0.5" in result["message"]

    out = Prefix(client=client, bucket=bucket, key="out/")
    manifest_doc = read_set(out)
    assert out.fixed_names() == sorted(
        ["silero_vad_fp16.onnx", "silero_vad_int8.onnx", "report.json", "manifest.json"]
    )
    assert manifest_doc["variant"] == "fp16" and manifest_doc["precision"] == "fp16"
    assert set(manifest_doc["variants"]) == {"fp16", "int8"}
    report = json.loads(get_bytes(client, bucket, "out/report.json"))
    assert report["selection"] == {"objective": "smallest", "chosen": "fp16",
                                   "why": report["selection"]["why"]}  # fmt: skip
    entries = {v["name"]: v for v in report["variants"]}
    assert entries["fp16"]["chosen"] and not entries["int8"]["chosen"]
    assert entries["int8"]["tolerance"] == {
        "maxMeanAbsError": 0.05,
        "minCosineSimilarity": 0.98,
        "outputKinds": {"embedding": {"minCosineSimilarity": 0.99}},  # INT8's default per kind
    }
    assert entries["fp16"]["tolerance"]["minCosineSimilarity"] == 0.999
    assert "error" in entries["int8_static"]
    assert {m["variant"] for m in report["models"]} == {"fp16", "int8"}
    # the same samples for every variant: the inputs kquant found, once per variant
    inputs = {m["variant"]: m["validation"].get("inputsChosen") for m in report["models"]}
    assert inputs["fp16"] == inputs["int8"] and inputs["fp16"]

    # promotion: the chosen variant only
    prod = Prefix(client=client, bucket=bucket, key="prod/")
    read_set(prod)
    assert prod.fixed_names() == sorted(["silero_vad_fp16.onnx", "report.json", "manifest.json"])

    table = run.log.split("  job ", 1)[1]
    rows = ("variant fp16 *", "variant int8 ", "variant int8_static",
            "FAILED (ConversionFailed)", "chosen ", "fp16 (smallest passing")  # fmt: skip
    for row in rows:
        assert row in table, row


@pytest.mark.parametrize(("objective", "chosen"), [("fastest", None), ("mostAccurate", "fp16")])
def test_the_objective_chooses(objective: str, chosen: str | None, tmp_path: Path) -> None:
    model = tmp_path / "m" / "silero_vad.onnx"
    model.parent.mkdir(parents=True)
    shutil.copyfile(silero_dir() / "silero_vad.onnx", model)
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", {}, endpoint=None,
                   validation={"latencyRuns": 30, "warmupRuns": 3})  # fmt: skip
    del job["spec"]["quantization"]
    job["spec"]["variants"] = [{"precision": "fp16"}, {"precision": "int8"}]
    job["spec"]["selection"] = {"objective": objective}
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert run.code == 0, run.log
    entries = {v["name"]: v for v in run.result["variants"]}
    if objective == "fastest":
        # The lowest measured latency wins. Which one that is on this CPU is not asserted:
        # Silero's two variants run within 0.05 ms of each other, measured in two processes
        # (the test flaked one run in three when it expected INT8).
        # Among the passing ones: Silero's INT8 can be NoGain (slower than FP32 by a hair
        # over 0.1 ms on a loaded machine), and then FP16 is the only choice.
        latency = {n: e["latencyMs"]["quantized"] for n, e in entries.items() if e["passed"]}
        chosen = min(latency, key=latency.get)
        assert "fastest passing" in run.log, run.log
    else:
        cosine = {n: e["cosineSimilarity"] for n, e in entries.items()}
        assert max(cosine, key=cosine.get) == chosen, cosine
    assert run.result["chosen"] == chosen


def test_no_passing_variant_fails_with_the_comparison(s3_server, bucket, worker_env, tmp_path):
    client = s3_server.client()
    client.upload_file(str(silero_dir() / "silero_vad.onnx"), bucket, "m/silero_vad.onnx")
    job = manifest(f"s3://{bucket}/m/silero_vad.onnx", f"s3://{bucket}/out/", {},
                   endpoint=s3_server.endpoint)  # fmt: skip
    del job["spec"]["quantization"]
    job["spec"]["variants"] = [
        {"precision": "int8", "strict": True},  # Silero's convolutions miss INT8's tolerance
        {"precision": "int8", "name": "int8_tight", "perChannel": True, "strict": True},
    ]
    run = run_worker(job, tmp_path, worker_env)
    assert (run.code, run.result["reason"]) == (40, "ValidationFailed"), run.log
    assert run.result["message"].startswith("no variant passed: int8: ValidationFailed")
    report = failure_report(client, bucket, "out/")
    assert [v["name"] for v in report["variants"]] == ["int8", "int8_tight"]
    assert report["selection"]["chosen"] is None
    assert re.search(r"  chosen +none passed", run.log), run.log
    assert [v["name"] for v in run.result["variants"]] == ["int8", "int8_tight"]


def test_a_folder_gets_one_subfolder_per_variant(tmp_path: Path) -> None:
    folder = tmp_path / "m" / "vad"
    folder.mkdir(parents=True)
    shutil.copyfile(silero_dir() / "silero_vad.onnx", folder / "silero_vad.onnx")
    (folder / "config.json").write_text('{"sample_rate": 16000}')
    job = manifest(f"file://{folder}/", f"file://{tmp_path}/out/", {}, endpoint=None)
    del job["spec"]["quantization"]
    # no gain verdict: Silero's INT8 runs 1.2-1.7x FP32's latency, by CPU
    job["spec"]["variants"] = [
        {"precision": "fp16"},
        {"precision": "int8", "name": "q8", "requireGain": False},
    ]
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert run.code == 0, run.log
    out = Prefix.of(f"file://{tmp_path}/out/")
    read_set(out)
    assert out.fixed_names() == sorted(["fp16/silero_vad.onnx", "fp16/config.json",
                                        "q8/silero_vad.onnx", "q8/config.json",
                                        "report.json", "manifest.json"])  # fmt: skip
    assert (tmp_path / "out" / "q8" / "config.json").read_text() == '{"sample_rate": 16000}'

    # a next generation without q8: its names go, and its folder with them (variants trial:
    # an empty q8/ stayed behind)
    job["metadata"]["generation"] = 2
    job["spec"]["output"]["overwrite"] = True
    job["spec"]["variants"] = job["spec"]["variants"][:1]
    again = run_worker(job, tmp_path / "again", dict(os.environ))
    assert again.code == 0, again.log
    assert out.fixed_names() == sorted(["fp16/silero_vad.onnx", "fp16/config.json",
                                        "report.json", "manifest.json"])  # fmt: skip
    assert not (tmp_path / "out" / "q8").exists()


def test_the_variants_example_promotes_the_best_silero_variant(s3_server, worker_env, tmp_path):
    import yaml
    from worker_helpers import upload_dir as upload
    from worker_helpers import upload_example_model

    job = yaml.safe_load((EXAMPLES / "silero-vad-variants.yaml").read_text())
    spec = job["spec"]
    spec["storage"]["endpoint"] = s3_server.endpoint  # the example's MinIO -> moto
    client = s3_server.client()
    upload_example_model(client, spec)
    # The example as shipped, but for INT8's gain verdict (Silero's INT8 runs 1.2-1.7x
    # FP32's latency, by CPU): the publishing of both variants is tested here.
    for variant in spec["variants"]:
        if variant["precision"] == "int8":
            variant["requireGain"] = False
    frames = write_feeds(speech_feeds(SILERO, spec["validation"]["samples"]), tmp_path / "eval")
    upload(client, "datasets", "vad-eval/", frames[0].parent)
    run = run_worker(job, tmp_path, worker_env)
    assert run.code == 0, run.log
    assert (run.result["chosen"], run.result["reason"]) == ("fp16", "Validated")
    assert all(v["passed"] for v in run.result["variants"]), run.log
    prod = Prefix.of(spec["promotion"]["uri"], client)
    promoted = read_set(prod)
    assert promoted["variant"] == "fp16"
    assert prod.fixed_names() == ["manifest.json", "report.json", "silero_vad_fp16.onnx"]
    # only what the promotion holds (it listed int8 too, absent there: trial)
    assert promoted["variants"] == {"fp16": ["silero_vad_fp16.onnx"]}
    report = json.loads(prod.get("report.json"))
    assert [f["path"] for f in report["files"]] == ["silero_vad_fp16.onnx"]
    assert {v["name"] for v in report["variants"]} == {"fp16", "int8"}  # the comparison
    out = Prefix.of(spec["output"]["uri"], client)
    read_set(out)
    assert "silero_vad_int8.onnx" in out.fixed_names()


def test_int4_variants_of_a_transformer(tmp_path: Path) -> None:
    from corpus import build_corpus

    bert = build_corpus()["bert_tiny"]
    model = tmp_path / "m" / "bert_tiny.onnx"
    model.parent.mkdir(parents=True)
    shutil.copyfile(bert.path, model)
    job = manifest(f"file://{model}", f"file://{tmp_path}/out/", {}, endpoint=None,
                   validation={**bert.validation, "samples": 4, "latencyRuns": 20})  # fmt: skip
    del job["spec"]["quantization"]
    # No latency verdict: bert_tiny runs in 0.1-0.2 ms, where one noisy block passes
    # MIN_SLOWDOWN_MS (FP16 has no CPU kernels either: q4f16 is slower here, faster on a GPU)
    job["spec"]["variants"] = [
        {"precision": "int4", "requireGain": False},
        {"precision": "int4", "floatPrecision": "fp16", "requireGain": False},
        {"precision": "int4", "name": "q4_hqq", "algorithm": "hqq", "requireGain": False},
    ]
    run = run_worker(job, tmp_path / "run", dict(os.environ))
    assert run.code == 0, run.log
    entries = {v["name"]: v for v in run.result["variants"]}
    assert list(entries) == ["q4", "q4f16", "q4_hqq"]
    assert all(e["passed"] for e in entries.values()), run.log
    # one FP32 reference pass: the first variant's, read back by the two others
    assert run.log.count("validation reference read from an earlier variant") == 2, run.log
    assert run.result["chosen"] == "q4f16"  # FP16 elsewhere: the smallest
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".onnx")
    assert names == ["bert_tiny_q4.onnx", "bert_tiny_q4_hqq.onnx", "bert_tiny_q4f16.onnx"]
