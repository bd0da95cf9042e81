"""The manifests under examples/ run as they are: the local demo manifest on file:// storage
(as README command 1 runs it), and the S3 examples against moto's server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SPEECH_WAV, silero_dir
from published import Prefix, read_set, set_files
from worker_helpers import (
    VARIANTS,
    run_worker,
    sha256,
    speech_feeds,
    upload_dir,
    upload_example_model,
)

from kquant_job.audio import write_feeds
from kquant_job.manifest import load_jobs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def kquant_job(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kquant_job.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )


def test_every_example_is_a_valid_job():
    paths = sorted(EXAMPLES.rglob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        assert load_jobs(str(path))


@pytest.fixture
def demo_dir(tmp_path: Path) -> Path:
    """What scripts/demo.sh prepares (the model), and speech frames cut by `kquant-job frames`
    for the frames example."""
    models = tmp_path / ".kquant-demo/models/silero-vad"
    models.mkdir(parents=True)
    (models / "silero_vad.onnx").write_bytes((silero_dir() / "silero_vad.onnx").read_bytes())
    frames = kquant_job(
        "frames",
        str(SPEECH_WAV),
        ".kquant-demo/data/speech-frames",
        "--frame-size",
        "512",
        "--context",
        "64",
        "--scalar",
        "sr=16000",
        "--zeros",
        "state=2,1,128",
        cwd=tmp_path,
    )
    assert frames.returncode == 0, frames.stderr
    return tmp_path


def test_local_demo_manifest_converts_validates_publishes_and_promotes(demo_dir: Path):
    run = kquant_job(
        "run",
        str(EXAMPLES / "local/silero-vad-fp16.yaml"),
        "--result-file",
        "result.json",
        "--work-dir",
        ".kquant-demo/work",  # relative, as scripts/demo.sh gives it
        cwd=demo_dir,
    )
    assert run.returncode == 0, run.stderr
    for stage in ("fetch", "convert", "validate", "publish", "promote"):
        assert f"{stage}: done" in run.stderr and "duration_ms=" in run.stderr
    for label in ("reduction", "max abs error", "latency (median)", "validation", "inputs"):
        assert label in run.stdout
    result = json.loads((demo_dir / "result.json").read_text())
    # the minimal spec: inputs found by kquant, speech frames with the state threaded
    assert result["validation"]["samples"] == 16
    assert "input [1, 576] speech" in result["validation"]["inputs"]
    assert "sr sample rate 16000" in result["validation"]["inputs"]
    out = Prefix(demo_dir / ".kquant-demo/out/silero-vad-fp16")
    prod = Prefix(demo_dir / ".kquant-demo/production/silero-vad")
    names = ["manifest.json", "report.json", "silero_vad_fp16.onnx"]
    assert out.fixed_names() == names and prod.fixed_names() == names
    manifest = read_set(prod)
    model = prod.get("silero_vad_fp16.onnx")
    [entry] = manifest["artifacts"]
    assert (entry["name"], entry["sha256"], entry["bytes"]) == (
        "silero_vad_fp16.onnx",
        sha256(model),
        len(model),
    )
    first = read_set(out)
    assert first["artifacts"][0]["sha256"] == sha256(model)
    assert result["artifacts"][0]["uri"].endswith(first["artifacts"][0]["path"])  # immutable

    # overwrite: true -> a second run publishes a new set; the first stays for rollback
    again = kquant_job("run", str(EXAMPLES / "local/silero-vad-fp16.yaml"), cwd=demo_dir)
    assert again.returncode == 0, again.stderr
    second = read_set(out)
    assert second["set"] != first["set"] and out.get("silero_vad_fp16.onnx") == model
    assert [h["set"] for h in second["history"]] == [second["set"], first["set"]]
    assert out.get(first["artifacts"][0]["path"]) == model


def test_frames_example_validates_on_speech_cut_from_a_wav(demo_dir: Path):
    run = kquant_job(
        "run", str(EXAMPLES / "local/silero-vad-fp16-frames.yaml"), "--result-file",
        "result.json", cwd=demo_dir,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads((demo_dir / "result.json").read_text())
    assert result["validation"]["samples"] == 180  # 5.74 s of speech in 512-sample windows
    assert "inputs" not in result["validation"]  # given, not found
    report = read_set(Prefix(demo_dir / ".kquant-demo/out/silero-vad-fp16-frames"))
    assert report["validation"]["passed"]


def test_several_documents_run_in_order_and_the_first_failure_sets_the_exit_code(demo_dir):
    job = yaml.safe_load((EXAMPLES / "local/silero-vad-fp16.yaml").read_text())
    broken = json.loads(json.dumps(job))
    broken["metadata"]["name"] = "missing-model"
    broken["spec"]["model"]["uri"] = "file://.kquant-demo/models/absent.onnx"
    broken["spec"]["output"]["uri"] = "file://.kquant-demo/out/absent/"
    broken.pop("promotion", None)
    broken["spec"].pop("promotion")
    (demo_dir / "jobs.yaml").write_text(yaml.safe_dump_all([job, broken]))
    run = kquant_job("run", "jobs.yaml", "--result-file", "result.json", cwd=demo_dir)
    assert run.returncode == 20, run.stderr
    lines = (demo_dir / "result.json").read_text().splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["reason"] for r in results] == ["Validated", "SourceNotFound"]
    # the failure leaves its report under the output, and nothing a reader would take for a set
    absent = Prefix(demo_dir / ".kquant-demo/out/absent")
    assert absent.fixed_names() == []
    [report, marker] = absent.all_keys()
    assert marker.endswith("/set.json") and report.endswith("/report.json")
    assert results[1]["reportUri"].endswith(report)
    outcome = json.loads(absent.get(report))["outcome"]
    assert outcome["reason"] == "SourceNotFound" and "absent.onnx" in outcome["message"]


@pytest.mark.parametrize("example", ["silero-vad-fp16.yaml", "silero-vad-int8-dynamic.yaml"])
def test_s3_example_runs_against_an_s3_server(example, s3_server, worker_env, tmp_path):
    job = yaml.safe_load((EXAMPLES / example).read_text())
    spec = job["spec"]
    spec["storage"]["endpoint"] = s3_server.endpoint  # the example's MinIO -> moto
    client = s3_server.client()
    upload_example_model(client, spec)
    variant = next(v for v in VARIANTS if v.file == "silero_vad.onnx")
    eval_dir = write_feeds(speech_feeds(variant, spec["validation"]["samples"]), tmp_path / "eval")[
        0
    ].parent
    upload_dir(client, "datasets", "vad-eval/", eval_dir)
    out_prefix = spec["output"]["uri"].removeprefix("s3://models/")
    if spec["quantization"]["precision"] == "int8":
        # The example as shipped, but for the gain verdict: Silero's INT8 runs 1.2-1.7x
        # FP32's latency, by CPU (CI's: NoGain); the verdict itself is test_worker_gain's.
        spec["quantization"]["requireGain"] = False
    run = run_worker(job, tmp_path, worker_env)
    assert run.code == 0, run.log
    assert run.result["reason"] == "Validated"
    out = Prefix(client=client, bucket="models", key=out_prefix)
    published = read_set(out)
    assert out.fixed_names() == ["manifest.json", *set_files(published)]
    assert len(set_files(published)) == 2
    if "promotion" in spec:
        prod = Prefix.of(spec["promotion"]["uri"], client)
        promoted = read_set(prod)
        assert prod.fixed_names() == out.fixed_names()
        assert [a["sha256"] for a in promoted["artifacts"]] == [
            a["sha256"] for a in published["artifacts"]
        ]
