"""Hostile and crashing model files through the real worker process: each ends with a precise
reason, a result file, a report.json under the output and a removed work directory, and
nothing outside the sandbox is touched or leaked."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest
from hostile_models import (
    busy_loop_jit,
    converted_writer_jit,
    fd_writer_jit,
    file_reader_jit,
    file_writer_jit,
    memory_hog_jit,
    pt_zip_bomb,
    transformer_jit,
)
from published import Prefix
from worker_helpers import manifest, run_worker

INPUTS = {"inputs": {"x": {"shape": [1, 16]}}, "samples": 2}
SECRET = "wJalrXUtnFEMI-sentinel-K7MDENG"


def job(model: Path, out: Path, precision: str = "fp16") -> dict:
    quantization = {"precision": precision}
    return manifest(f"file://{model}", f"file://{out}/", quantization, endpoint=None,
                    validation=INPUTS)  # fmt: skip


def env(**extra: str) -> dict[str, str]:
    # storage credentials in the worker's environment, as the pod's secretKeyRefs put them
    return {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIA", **extra}


def failed(run, tmp_path: Path, reason: str) -> dict:
    """Check the common promises of a failed run; returns its report."""
    assert run.code == 30, run.log  # every reason here is of the conversion class
    assert run.result["reason"] == reason, run.result
    out = Prefix(tmp_path / "out")
    assert out.fixed_names() == []  # nothing a reader would take for a set
    report = json.loads((tmp_path / "out" / run.result["reportUri"].split("/out/", 1)[1])
                        .read_text())  # fmt: skip
    assert report["outcome"]["reason"] == reason
    assert list((tmp_path / "work").iterdir()) == []  # the work directory was removed
    everything = (
        run.log
        + json.dumps(run.result)
        + "".join(
            p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*") if p.is_file()
        )
    )
    assert SECRET not in everything
    return report


def test_a_model_writing_outside_its_work_directory_is_stopped(tmp_path):
    victim = tmp_path / "production-config.yaml"
    victim.write_bytes(b"replicas: 3\n" * 8)
    model = file_writer_jit(tmp_path / "writer.pt", victim, 16)
    run = run_worker(job(model, tmp_path / "out"), tmp_path, env())
    failed(run, tmp_path, "UnsafeModel")
    assert victim.read_bytes() == b"replicas: 3\n" * 8
    assert "outside its sandbox" in run.result["message"]


@pytest.mark.parametrize("folder", [False, True])
def test_a_source_read_in_place_cannot_be_changed_by_its_model(tmp_path, folder):
    # A file:// source is not copied: the sandbox may read it where it lies, never write.
    models = tmp_path / "models"
    models.mkdir()
    (models / "config.yaml").write_bytes(b"sample_rate: 16000\n")
    model = models / "writer.pt"
    victim = models / "config.yaml" if folder else model
    file_writer_jit(model, victim, 16)
    before = {p.name: p.read_bytes() for p in models.iterdir()}
    source = f"file://{models}/" if folder else f"file://{model}"
    spec = manifest(source, f"file://{tmp_path}/out/", {"precision": "fp16"}, endpoint=None,
                    validation=INPUTS)  # fmt: skip
    run = run_worker(spec, tmp_path, env())
    failed(run, tmp_path, "UnsafeModel")
    assert {p.name: p.read_bytes() for p in models.iterdir()} == before
    assert "reading the source in place" in run.log


def test_a_conversion_whose_code_rewrites_its_own_output_publishes_nothing(tmp_path):
    """The converted module, run by validation, overwrites the file the conversion staged
    (its working directory is the sandbox folder): before, those bytes were published as
    Validated. The conversion pinned them; the worker finds them changed."""
    model = converted_writer_jit(tmp_path / "tamper.pt", [("staged/tamper_fp16.pt", bytes(64))])
    run = run_worker(job(model, tmp_path / "out"), tmp_path, env())
    failed(run, tmp_path, "UnsafeModel")
    assert "tamper_fp16.pt changed after the conversion wrote it" in run.result["message"]


def test_files_and_an_outcome_written_by_model_code_are_not_taken(tmp_path):
    """The converted module drops a file beside its output and writes the success its
    sandbox would report into that folder: the stage's outcome travels through a pipe, and
    a file no conversion wrote ends the job."""
    forged = json.dumps({"ok": {"models": [], "copies": [], "kept": {}, "timings": {}},
                         "sandbox": {}}).encode()  # fmt: skip
    writes = [("staged/injected.txt", b"INJECTED BY MODEL\n"), ("outcome.json", forged)]
    model = converted_writer_jit(tmp_path / "inject.pt", writes)
    run = run_worker(job(model, tmp_path / "out"), tmp_path, env())
    failed(run, tmp_path, "UnsafeModel")
    assert "injected.txt, which no conversion wrote" in run.result["message"]
    assert not list((tmp_path / "out").rglob("injected.txt"))


def test_a_model_writing_into_its_own_pipes_is_an_unsafe_model_and_forges_no_log(tmp_path):
    """Trial: aten::save to /proc/self/fd/N reached the log pipe (forged ERROR records in the
    worker's log) and the outcome pipe (an InternalError, which a Job retries)."""
    forged = ('\n{"message": "publish: done FORGED", "level": "error", "logger": "kquant", '
              '"stage": "publish", "uri": "s3://attacker/forged"}\n')  # fmt: skip
    model = fd_writer_jit(tmp_path / "fds.pt", list(range(3, 16)), forged)
    run = run_worker(job(model, tmp_path / "out"), tmp_path, env())
    failed(run, tmp_path, "UnsafeModel")
    assert "model code wrote" in run.result["message"]
    assert "did not write" in run.log  # the forged lines, shown as what they are
    assert not any(
        "publish: done FORGED" in line and "did not write" not in line
        for line in run.log.splitlines()
    )


def test_a_model_filling_its_folder_past_the_work_volume_ends_in_disk_limit_exceeded(tmp_path):
    """96 MiB of real bytes written by model code into its folder's tmp/, with a work
    volume of 64 MiB (KQUANT_WORK_BYTES): before, the job validated and a pod would have
    been evicted by the kubelet, with no result."""
    model = file_writer_jit(tmp_path / "hog.pt", Path("tmp/hog.bin"), 96 * 2**20)
    run = run_worker(job(model, tmp_path / "out"), tmp_path, env(KQUANT_WORK_BYTES=str(2**26)))
    failed(run, tmp_path, "DiskLimitExceeded")
    assert "past the" in run.result["message"] and "KQUANT_WORK_BYTES" in run.result["message"]


def test_a_file_made_by_model_code_where_the_stage_needs_a_folder_is_unsafe_model(tmp_path):
    """The forward, run to choose validation inputs, creates a file named like the stage's
    scratch folder: before, an InternalError (exit 1, retried by the Job on a model that
    fails the same way every time)."""
    model = file_writer_jit(tmp_path / "squat.pt", Path("scratch"), 1)
    run = run_worker(job(model, tmp_path / "out"), tmp_path, env())
    failed(run, tmp_path, "UnsafeModel")
    assert "scratch" in run.result["message"]


def test_a_model_reading_credentials_outside_its_sandbox_gets_nothing(tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_secret_access_key = {SECRET}\n")
    model = file_reader_jit(tmp_path / "reader.pt", creds, 32)
    run = run_worker(job(model, tmp_path / "out"), tmp_path, env())
    report = failed(run, tmp_path, "UnsafeModel")  # and the secret is nowhere (see failed)
    assert "outside its sandbox" in report["outcome"]["message"]


def test_a_crash_of_the_quantizer_ends_in_model_crashed(tmp_path):
    model = transformer_jit(tmp_path / "encoder.pt")
    run = run_worker(job(model, tmp_path / "out", "int8"), tmp_path, env())
    report = failed(run, tmp_path, "ModelCrashed")
    assert "SIGSEGV" in run.result["message"] and "encoder.pt" in run.result["message"]
    assert report["outcome"]["message"] == run.result["message"]


def test_a_model_that_never_returns_is_stopped_at_the_time_limit(tmp_path):
    model = busy_loop_jit(tmp_path / "loop.pt")
    start = time.monotonic()
    run = run_worker(
        job(model, tmp_path / "out"), tmp_path, env(KQUANT_SANDBOX_TIMEOUT_SECONDS="4")
    )
    failed(run, tmp_path, "TimeLimitExceeded")
    assert time.monotonic() - start < 60
    assert "4 s" in run.result["message"]
    commands = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    assert [c for c in commands if "sandbox.child" in c and str(tmp_path) in c] == []


def test_a_model_beyond_the_memory_limit_ends_in_memory_limit_exceeded(tmp_path):
    model = memory_hog_jit(tmp_path / "hog.pt", 3 * 2**30)
    limit = str(2**30)
    run = run_worker(job(model, tmp_path / "out"), tmp_path, env(KQUANT_SANDBOX_MEMORY_BYTES=limit))
    failed(run, tmp_path, "MemoryLimitExceeded")
    assert limit in run.result["message"]


@pytest.mark.parametrize("inflated", [2 * 2**30])
def test_a_pt_zip_bomb_is_refused_before_it_inflates(tmp_path, inflated):
    model = pt_zip_bomb(tmp_path / "bomb.pt", inflated)
    assert model.stat().st_size < 4 * 2**20
    run = run_worker(job(model, tmp_path / "out"), tmp_path, env())
    failed(run, tmp_path, "UnsafeModel")
    assert "archive bomb" in run.result["message"] and "data.pkl" in run.result["message"]
