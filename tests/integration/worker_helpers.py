"""Helpers for running the worker end to end: per-variant speech feeds for the Silero VAD
models, manifests, and helpers to run ``kquant-job`` and read what it published."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from conftest import SPEECH_WAV, silero_dir

from kquant_job.audio import frame_feeds, read_wav, thread_state


@dataclass(frozen=True)
class Variant:
    """How one Silero VAD ONNX file is fed: 512-sample windows with 64 samples of context
    (576 wide, as the package's wrapper does), plus its own state inputs."""

    file: str
    extra: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    feedback: dict[str, str] = field(default_factory=dict)

    def extras(self) -> dict[str, np.ndarray]:
        out = {}
        for name, (shape, dtype) in self.extra.items():
            out[name] = np.array(16000, np.int64) if dtype == "sr" else np.zeros(shape, dtype)
        return out


_STATE = {"state": ((2, 1, 128), "float32")}
_SR = {"sr": ((), "sr")}
VARIANTS = [
    Variant("silero_vad.onnx", {**_STATE, **_SR}, {"stateN": "state"}),
    Variant("silero_vad_16k_op15.onnx", {**_STATE, **_SR}, {"stateN": "state"}),
    Variant(
        "silero_vad_16k_sequence.onnx",
        {"h": ((1, 1, 128), "float32"), "c": ((1, 1, 128), "float32")},
        {"hn": "h", "cn": "c"},
    ),
    Variant("silero_vad_half.onnx", _STATE, {"stateN": "state"}),
    Variant("silero_vad_op18_ifless.onnx", {**_STATE, **_SR}, {"stateN": "state"}),
    Variant("silero_vad_openvino_16k.onnx", _STATE, {"stateN": "state"}),
]


def speech_feeds(variant: Variant, frames: int, *, threaded: bool = False) -> list[dict]:
    """Real speech frames from the fixture WAV, shaped for ``variant``; with ``threaded``,
    each feed carries the state the FP32 model has at that frame (for calibration)."""
    samples, rate = read_wav(SPEECH_WAV)
    assert rate == 16000
    feeds = frame_feeds(samples, 512, "input", extra=variant.extras(), context=64)[:frames]
    if threaded:
        feeds = thread_state(silero_dir() / variant.file, feeds, variant.feedback)
    return feeds


def upload_example_model(client: Any, spec: dict[str, Any]) -> None:
    """For an example manifest on moto: its ``models`` and ``datasets`` buckets, and Silero
    VAD's ONNX file at its ``spec.model.uri`` (under ``s3://models/``)."""
    for name in ("models", "datasets"):
        if name not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            client.create_bucket(Bucket=name)
    key = spec["model"]["uri"].removeprefix("s3://models/")
    client.upload_file(str(silero_dir() / "silero_vad.onnx"), "models", key)


def upload_dir(client: Any, bucket: str, prefix: str, local: Path) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, prefix + path.relative_to(local).as_posix())


def list_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix) :] for p in pages for o in p.get("Contents", []))


def get_bytes(client: Any, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class WorkerRun:
    """A finished ``kquant-job run``: exit code, parsed result, and its log text."""

    code: int
    result: dict[str, Any]
    log: str


def run_worker(
    manifest: dict | str,
    tmp_path: Path,
    env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
) -> WorkerRun:
    """Run the real console entry point as a subprocess, as the Job's container does."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "job.yaml"
    path.write_text(manifest if isinstance(manifest, str) else yaml.safe_dump(manifest))
    result_file = tmp_path / "result.json"
    result_file.unlink(missing_ok=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kquant_job.cli",
            "run",
            str(path),
            "--result-file",
            str(result_file),
            "--work-dir",
            str(tmp_path / "work"),
            *extra_args,
        ],
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    return WorkerRun(proc.returncode, result, proc.stderr + proc.stdout)


def manifest(
    model_uri: str,
    output_uri: str,
    quantization: dict,
    *,
    endpoint: str | None,
    validation: dict | None = None,
    promotion: str | None = None,
    name: str = "job",
) -> dict:
    spec: dict[str, Any] = {
        "model": {"uri": model_uri},
        "output": {"uri": output_uri},
        "quantization": quantization,
        "validation": {"latencyRuns": 3, "warmupRuns": 1, **(validation or {})},
    }
    if endpoint:
        spec["storage"] = {"endpoint": endpoint, "region": "us-east-1"}
    if promotion:
        spec["promotion"] = {"uri": promotion}
    return {
        "apiVersion": "kquant.io/v1alpha1",
        "kind": "QuantizationJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def failure_report(client: Any, bucket: str, prefix: str) -> dict[str, Any]:
    """The report a failed run left under ``prefix``, checking that it is all it left: one
    set folder with its marker (state failed) and report.json, no manifest, no fixed names."""
    keys = list_keys(client, bucket, prefix)
    assert len(keys) == 2 and all(k.startswith(".kquant/sets/") for k in keys), keys
    marker, report = sorted(keys, key=lambda k: not k.endswith("set.json"))
    assert marker.endswith("/set.json") and report.endswith("/report.json"), keys
    assert json.loads(get_bytes(client, bucket, prefix + marker))["state"] == "failed"
    return json.loads(get_bytes(client, bucket, prefix + report))


def published_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """The fixed names under ``prefix`` (kquant's ``.kquant/`` folder left out), after
    checking the published set as a reader would (:func:`published.read_set`)."""
    from published import Prefix, read_set

    out = Prefix(client=client, bucket=bucket, key=prefix)
    read_set(out)
    return out.fixed_names()
